"""The offline model zoo: one small Llama base and its fine-tuned tenants.

``build_zoo(ZooConfig.default(), cache_dir)`` builds (or finds in the cache):

- corpora for the domains of qdelta.corpus (train + held-out eval text),
- ``base/``: a byte-level Llama causal LM pretrained on a mixture of domains,
- ``tenants/<name>/``: fine-tunes of that base, as Hugging Face model
  directories (config.json + model.safetensors + the byte tokenizer):
  full fine-tunes, a LoRA fine-tune merged into dense weights, and a model
  soup (the exact average of two fine-tunes of one domain),
- ``ingredients/<name>/``: soup ingredients that are not tenants themselves,
- ``zoo.json``: the manifest (config, corpus sizes, timings, perplexities).

The cache directory name is a hash of the config (seed included), the build
code's version and the Python minor version (whose stdlib is the code corpus).
A zoo is built in a temporary directory and renamed into place when complete,
so a cache entry is either whole or absent.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from qdelta.atomic_io import current_umask, ensure_dir, read_regular_text, write_json_atomic
from qdelta.corpus import DOMAINS, DomainCorpus, build_domain
from qdelta.errors import FileError, FormatError, ZooError
from qdelta.eval import perplexity
from qdelta.optional import require
from qdelta.store_cli import printable
from qdelta.tokenizer import ByteTokenizer

# Bump when a change to this module or qdelta.corpus changes what a build makes.
ZOO_VERSION = 1
MANIFEST = "zoo.json"
REQUIRED_DOMAINS = ("code", "prose")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TenantSpec:
    """How one fine-tune is made from the base.

    kind "full": all weights trained; "lora": a rank-``rank`` LoRA on every
    linear layer, merged into dense weights; "soup": the average of the
    ``ingredients`` (names of earlier specs). ``listed=False`` builds the model
    as a soup ingredient only (saved under ingredients/, not a tenant).
    """

    name: str
    domain: str
    kind: Literal["full", "lora", "soup"]
    steps: int = 0
    lr: float = 0.0
    seed: int = 0
    rank: int = 0
    alpha: float = 0.0
    ingredients: tuple[str, ...] = ()
    fallback_domain: str | None = None
    listed: bool = True


@dataclass(frozen=True)
class ZooConfig:
    """Sizes of the model, the corpora and the training runs; hashed into the cache key."""

    seed: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq_len: int
    batch_size: int
    train_bytes: int  # per domain
    eval_bytes: int  # per domain
    max_doc_bytes: int
    pretrain_steps: int
    pretrain_lr: float
    tenants: tuple[TenantSpec, ...]
    # Perplexity windows never exceed the training context: positions the model
    # never saw in training would measure extrapolation, not the domain.
    eval_window: int = 128
    eval_batch_size: int = 8
    evaluate: bool = True  # record base / tenant perplexities in the manifest

    @staticmethod
    def standard_tenants(
        steps: int, lr: float, lora_steps: int, lora_lr: float, rank: int
    ) -> tuple[TenantSpec, ...]:
        return (
            TenantSpec("code", "code", "full", steps=steps, lr=lr, seed=1),
            TenantSpec("prose", "prose", "full", steps=steps, lr=lr, seed=2),
            TenantSpec(
                "man-lora",
                "man",
                "lora",
                steps=lora_steps,
                lr=lora_lr,
                seed=3,
                rank=rank,
                alpha=2.0 * rank,
                fallback_domain="prose",
            ),
            # The second soup ingredient: same domain, another seed and learning rate.
            TenantSpec("code-b", "code", "full", steps=steps, lr=lr * 0.6, seed=4, listed=False),
            TenantSpec("code-soup", "code", "soup", ingredients=("code", "code-b")),
        )

    @classmethod
    def default(cls, seed: int = 0) -> ZooConfig:
        """Real sizes: the whole build takes a few minutes on 2 CPU cores."""
        return cls(
            seed=seed,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            intermediate_size=352,
            seq_len=128,
            batch_size=16,
            train_bytes=1_500_000,
            eval_bytes=32_000,
            max_doc_bytes=16_000,
            pretrain_steps=400,
            pretrain_lr=3e-3,
            tenants=cls.standard_tenants(steps=100, lr=1e-3, lora_steps=100, lora_lr=1e-2, rank=8),
            eval_window=128,
            eval_batch_size=16,
        )

    @classmethod
    def tiny(cls, seed: int = 0) -> ZooConfig:
        """CI sizes: the whole build takes seconds."""
        return cls(
            seed=seed,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            seq_len=32,
            batch_size=8,
            train_bytes=48_000,
            eval_bytes=3_000,
            max_doc_bytes=6_000,
            pretrain_steps=30,
            pretrain_lr=3e-3,
            tenants=cls.standard_tenants(steps=10, lr=2e-3, lora_steps=10, lora_lr=5e-3, rank=4),
            eval_window=32,
            eval_batch_size=16,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ZooConfig:
        data = dict(data)
        data["tenants"] = tuple(
            TenantSpec(**{**t, "ingredients": tuple(t["ingredients"])}) for t in data["tenants"]
        )
        return cls(**data)

    def cache_key(self) -> str:
        payload = {
            "config": self.to_dict(),
            "zoo_version": ZOO_VERSION,
            "python": list(sys.version_info[:2]),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def llama_config(self, tokenizer: ByteTokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=max(4 * self.seq_len, 2 * self.eval_window, 1024),
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            tie_word_embeddings=False,
        )


@dataclass(frozen=True)
class Tenant:
    name: str
    domain: str
    kind: str
    path: Path


@dataclass
class Zoo:
    """A built zoo: where its models are and the text they were trained / evaluated on."""

    root: Path
    config: ZooConfig
    base_dir: Path
    tenants: dict[str, Tenant]
    ingredients: dict[str, Path]
    eval_texts: dict[str, str]
    train_texts: dict[str, str]
    tokenizer: ByteTokenizer
    manifest: dict
    built: bool = False  # True when this call built it, False when it came from the cache

    @property
    def domains(self) -> list[str]:
        return sorted(self.eval_texts)

    def model_dir(self, name: str) -> Path:
        if name == "base":
            return self.base_dir
        if name in self.tenants:
            return self.tenants[name].path
        if name in self.ingredients:
            return self.ingredients[name]
        raise ZooError(
            f"expected 'base', a tenant {sorted(self.tenants)} or an ingredient "
            f"{sorted(self.ingredients)}, found {name!r}"
        )

    def load(self, name: str = "base", dtype: torch.dtype = torch.float32):
        """The model ``name`` ("base", a tenant or an ingredient) as a LlamaForCausalLM."""
        LlamaForCausalLM = require("transformers", "Zoo.load").LlamaForCausalLM
        from safetensors import SafetensorError

        where = self.model_dir(name)
        try:
            model = LlamaForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True)
        except (OSError, SafetensorError) as e:  # a cache damaged after it was built
            raise ZooError(
                f"zoo model {name!r} in {where}: expected its config and weights as the zoo "
                f"wrote them, found: {' '.join(str(e).split())}; delete {self.root} to "
                "rebuild the zoo"
            ) from e
        return model.eval()


# ---------------------------------------------------------------- training


def _domain_stream(text: str, tokenizer: ByteTokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text, bos=True), dtype=torch.long)


def _sample_batch(
    streams: list[torch.Tensor], batch: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens, each from a uniformly drawn stream."""
    which = torch.randint(len(streams), (batch,), generator=gen).tolist()
    rows = []
    for i in which:
        s = streams[i]
        start = int(torch.randint(s.numel() - seq_len - 1, (1,), generator=gen))
        rows.append(s[start : start + seq_len + 1])
    return torch.stack(rows)


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 10% of steps, cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_lm(
    model: torch.nn.Module,
    streams: list[torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    seed: int,
    weight_decay: float = 0.0,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> list[float]:
    """AdamW next-token training on random windows of ``streams``; returns the losses.
    ``on_step(step, model)`` runs after each optimizer step (1-based; e.g. checkpoints)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        batch = _sample_batch(streams, batch_size, seq_len, gen)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, model)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _train_lora(model, spec: TenantSpec, streams, config: ZooConfig, progress: bool):
    """A LoRA fine-tune of ``model`` (peft, offline), merged back into dense weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)  # the LoRA A matrices' initialisation
    lora = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=0.0,
        target_modules=list(LINEAR_NAMES),
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    losses = train_lm(
        peft_model,
        streams,
        steps=spec.steps,
        lr=spec.lr,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=spec.seed,
        desc=f"tenant {spec.name} (LoRA r={spec.rank})",
        progress=progress,
    )
    return peft_model.merge_and_unload(), losses


def soup_state_dict(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with equal keys, shapes and dtypes (in fp32)."""
    keys = set(state_dicts[0])
    for sd in state_dicts[1:]:
        if set(sd) != keys:
            raise ZooError(f"soup ingredients differ in their tensors: {sorted(keys ^ set(sd))}")
    out = {}
    for k in sorted(keys):
        total = state_dicts[0][k].float().clone()
        for sd in state_dicts[1:]:
            if sd[k].shape != total.shape:
                raise ZooError(
                    f"soup ingredient {k}: expected {tuple(total.shape)}, found {tuple(sd[k].shape)}"
                )
            total += sd[k].float()
        out[k] = (total / len(state_dicts)).to(state_dicts[0][k].dtype)
    return out


def _save_model(model, directory: Path, tokenizer: ByteTokenizer) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(directory)


def _load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


# ---------------------------------------------------------------- building


def default_cache_dir() -> Path:
    """``$QDELTA_CACHE/zoo`` (``~`` expanded), else ``~/.cache/qdelta/zoo``."""
    root = os.environ.get("QDELTA_CACHE") or Path.home() / ".cache" / "qdelta"
    return Path(root).expanduser() / "zoo"


def _build_corpora(config: ZooConfig) -> tuple[dict[str, DomainCorpus], list[str]]:
    corpora, notes = {}, []
    for domain in tqdm(DOMAINS, desc="corpora", leave=False):
        c = build_domain(
            domain,
            train_bytes=config.train_bytes,
            eval_bytes=config.eval_bytes,
            max_doc_bytes=config.max_doc_bytes,
            seed=config.seed,
        )
        min_train = max(4 * (config.seq_len + 1), config.train_bytes // 4)
        min_eval = max(2 * config.eval_window, config.eval_bytes // 4)
        enough = len(c.train_text) >= min_train and len(c.eval_text) >= min_eval
        if enough:
            corpora[domain] = c
        elif domain in REQUIRED_DOMAINS:
            raise ZooError(
                f"corpus {domain!r}: expected >= {min_train} train and >= {min_eval} eval bytes, "
                f"found {len(c.train_text)} and {len(c.eval_text)} (are its source files missing?)"
            )
        else:
            notes.append(f"domain {domain!r} skipped: too little text on this machine")
    return corpora, notes


def _build(config: ZooConfig, root: Path, progress: bool) -> dict:
    tokenizer = ByteTokenizer()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpora, notes = _build_corpora(config)
    (root / "data").mkdir()
    for domain, c in corpora.items():
        (root / "data" / f"{domain}.train.txt").write_text(c.train_text, encoding="utf-8")
        (root / "data" / f"{domain}.eval.txt").write_text(c.eval_text, encoding="utf-8")
    streams = {d: _domain_stream(c.train_text, tokenizer) for d, c in corpora.items()}
    timings["corpora_s"] = time.perf_counter() - t0

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t = time.perf_counter()
    torch.manual_seed(config.seed)
    base = LlamaForCausalLM(config.llama_config(tokenizer))
    base_losses = train_lm(
        base,
        [streams[d] for d in sorted(streams)],
        steps=config.pretrain_steps,
        lr=config.pretrain_lr,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        seed=config.seed,
        weight_decay=0.01,
        desc="pretrain base",
        progress=progress,
    )
    _save_model(base, root / "base", tokenizer)
    timings["pretrain_s"] = time.perf_counter() - t

    built: dict[str, dict] = {}
    for spec in config.tenants:
        t = time.perf_counter()
        domain = spec.domain
        if domain not in corpora:
            if spec.fallback_domain not in corpora:
                raise ZooError(f"tenant {spec.name}: expected corpus {domain!r}, found none")
            notes.append(
                f"tenant {spec.name}: domain {domain!r} missing, used {spec.fallback_domain!r}"
            )
            domain = spec.fallback_domain
        rel = Path("tenants" if spec.listed else "ingredients") / spec.name
        losses: list[float] = []
        if spec.kind == "soup":
            missing = [n for n in spec.ingredients if n not in built]
            if len(spec.ingredients) < 2 or missing:
                raise ZooError(
                    f"soup {spec.name}: expected >= 2 ingredients built before it, "
                    f"found {list(spec.ingredients)} (not built: {missing})"
                )
            model = copy.deepcopy(base)
            parts = [_load_weights(root / built[n]["path"]) for n in spec.ingredients]
            model.load_state_dict(soup_state_dict(parts))
        elif spec.kind == "full":
            model = copy.deepcopy(base)
            losses = train_lm(
                model,
                [streams[domain]],
                steps=spec.steps,
                lr=spec.lr,
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                seed=spec.seed,
                desc=f"tenant {spec.name} ({domain})",
                progress=progress,
            )
        elif spec.kind == "lora":
            model, losses = _train_lora(
                copy.deepcopy(base), spec, [streams[domain]], config, progress
            )
        else:
            raise ZooError(f"tenant {spec.name}: expected kind full/lora/soup, found {spec.kind!r}")
        _save_model(model, root / rel, tokenizer)
        built[spec.name] = {
            "domain": domain,
            "kind": spec.kind,
            "path": rel.as_posix(),
            "listed": spec.listed,
            "final_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - t,
        }
        if spec.kind == "soup":
            built[spec.name]["ingredients"] = list(spec.ingredients)
        if spec.kind == "lora":
            built[spec.name]["rank"] = spec.rank
        del model
    timings["tenants_s"] = sum(b["seconds"] for b in built.values())

    quality = {}
    if config.evaluate:
        t = time.perf_counter()
        quality = _evaluate_zoo(config, root, corpora, built, tokenizer, progress)
        timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return {
        "key": config.cache_key(),
        "zoo_version": ZOO_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
        "config": config.to_dict(),
        "params": sum(p.numel() for p in base.parameters()),
        "corpora": {
            d: {**c.summary(), "train_docs_list": c.train_docs, "eval_docs_list": c.eval_docs}
            for d, c in corpora.items()
        },
        "models": built,
        "pretrain_final_loss": base_losses[-1],
        "quality": quality,
        "timings": timings,
        "notes": notes,
    }


def _evaluate_zoo(config, root, corpora, built, tokenizer, progress) -> dict:
    """Base on every domain, each listed tenant on its own domain (held-out text)."""
    from transformers import LlamaForCausalLM

    jobs = [("base", "base", d) for d in sorted(corpora)]
    jobs += [(n, b["path"], b["domain"]) for n, b in built.items() if b["listed"]]
    quality: dict[str, dict] = {}
    for name, rel, domain in tqdm(jobs, desc="perplexity", disable=not progress):
        model = LlamaForCausalLM.from_pretrained(root / rel).eval()
        result = perplexity(
            model,
            corpora[domain].eval_text,
            tokenizer,
            window=config.eval_window,
            batch_size=config.eval_batch_size,
        )
        quality.setdefault(name, {})[domain] = result.to_dict()
    return quality


def open_zoo(root: str | Path, built: bool = False) -> Zoo:
    """A zoo from its directory (as build_zoo made it)."""
    root = Path(root)
    try:
        manifest = json.loads(read_regular_text(root / MANIFEST))
    except (OSError, ValueError, FileError) as e:
        raise ZooError(
            f"expected a complete zoo with {MANIFEST} in {root}, found: {e}; "
            f"delete the directory to rebuild it"
        ) from e
    rebuild = f"delete {root} to rebuild it"
    try:
        config = ZooConfig.from_dict(manifest["config"])
        domains = sorted(manifest["corpora"])
        models = manifest["models"]
        tenants = {
            n: Tenant(n, m["domain"], m["kind"], root / m["path"])
            for n, m in models.items()
            if m["listed"]
        }
        ingredients = {n: root / m["path"] for n, m in models.items() if not m["listed"]}
    except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or foreign zoo.json
        found = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ZooError(
            f"{root / MANIFEST}: expected a zoo manifest with config, corpora and models, "
            f"found {found}; {rebuild}"
        ) from e

    # Existence only (opening stays cheap); a damaged file is named by Zoo.load.
    for model_dir in [root / "base", *(t.path for t in tenants.values()), *ingredients.values()]:
        missing = [f for f in ("config.json", "model.safetensors") if not (model_dir / f).is_file()]
        if missing:
            raise ZooError(
                f"{root}: expected a complete zoo, found no {' or '.join(missing)} in "
                f"{model_dir}; {rebuild}"
            )

    def text(name: str) -> str:
        try:
            return read_regular_text(root / "data" / name)
        except (OSError, ValueError, FileError) as e:
            raise ZooError(
                f"{root}: expected a complete zoo with data/{name}, found {type(e).__name__}: "
                f"{e}; {rebuild}"
            ) from e

    try:
        tokenizer = ByteTokenizer.load(root / "base")
    except (FileError, FormatError) as e:
        raise ZooError(f"{root}: {e}; {rebuild}") from e
    return Zoo(
        root=root,
        config=config,
        base_dir=root / "base",
        tenants=tenants,
        ingredients=ingredients,
        eval_texts={d: text(f"{d}.eval.txt") for d in domains},
        train_texts={d: text(f"{d}.train.txt") for d in domains},
        tokenizer=tokenizer,
        manifest=manifest,
        built=built,
    )


def build_zoo(
    config: ZooConfig | None = None,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = True,
) -> Zoo:
    """The zoo of ``config`` from ``cache_dir``, built there first if absent."""
    for package in ("transformers", "peft"):  # training, the LoRA tenant, loading
        require(package, "the model zoo")
    config = config or ZooConfig.default()
    if config.eval_window > config.seq_len:
        raise ZooError(
            f"eval_window: expected at most the training context ({config.seq_len} tokens), "
            f"found {config.eval_window}"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"zoo-{config.cache_key()}"
    if final.exists():
        zoo = open_zoo(final)
        if zoo.manifest.get("key") != config.cache_key():
            raise ZooError(
                f"{final}: expected a zoo with key {config.cache_key()}, "
                f"found {zoo.manifest.get('key')}; delete the directory to rebuild it"
            )
        return zoo
    ensure_dir(cache_dir, "zoo cache")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=cache_dir))
    except OSError as e:
        raise ZooError(f"zoo cache {cache_dir}: expected a writable directory, found {e}") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # peft / transformers chatter
            warnings.simplefilter("ignore", FutureWarning)
            manifest = _build(config, tmp, progress)
        write_json_atomic(tmp / MANIFEST, manifest)
        # mkdtemp's 0o700 would keep the zoo from others sharing $QDELTA_CACHE.
        os.chmod(tmp, 0o777 & ~current_umask())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same zoo first
            return open_zoo(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, FileError)) or type(e).__name__ == "SafetensorError":
            raise ZooError(f"zoo cache {cache_dir}: building {final.name} failed: {e}") from e
        raise
    return open_zoo(final, built=True)


def zoo_report(zoo: Zoo) -> str:
    """A short text summary: sizes, timings and base vs tenant perplexity per domain."""
    m = zoo.manifest
    lines = [
        f"zoo {printable(zoo.root)}",
        f"  base: Llama, {m['params']:,} parameters, byte vocabulary {zoo.tokenizer.vocab_size}",
        "  corpora: "
        + ", ".join(
            f"{d} {c['train_bytes'] / 1e6:.2f} MB train / {c['eval_bytes'] / 1e3:.0f} kB eval"
            for d, c in m["corpora"].items()
        ),
        "  build: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in m["timings"].items()),
    ]
    q = m.get("quality") or {}
    if q:
        lines.append(
            f"  {'tenant':<12} {'kind':<5} {'domain':<6} {'ppl base':>9} {'ppl tenant':>11}"
        )
        for name, t in zoo.tenants.items():
            base = q["base"][t.domain]["ppl"]
            mine = q[name][t.domain]["ppl"]
            lines.append(f"  {name:<12} {t.kind:<5} {t.domain:<6} {base:>9.4f} {mine:>11.4f}")
    lines += [f"  note: {n}" for n in m.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from qdelta.cli import SEED

    parser = argparse.ArgumentParser(
        prog="python -m qdelta.zoo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tiny", action="store_true", help="the CI-sized configuration")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument(
        "--cache", default=None, help=f"cache directory (default {default_cache_dir()})"
    )
    args = parser.parse_args(argv)
    config = (ZooConfig.tiny if args.tiny else ZooConfig.default)(seed=args.seed)
    zoo = build_zoo(config, args.cache)
    print(zoo_report(zoo))
    return 0


if __name__ == "__main__":
    # Through the CLI: an error is its one line (`qdelta zoo: error: ...`), not a traceback.
    from qdelta.cli import main as cli_main

    sys.exit(cli_main(["zoo", *sys.argv[1:]]))
