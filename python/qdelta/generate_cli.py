"""``qdelta generate BASE_DIR STORE_DIR --tenant A --tenant B --prompt TEXT``: one
batch, each row served by its own tenant of a delta store over one base model,
printed per row (or as JSON)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qdelta.compress_cli import local_tokenizer
from qdelta.errors import FileError, ShapeError
from qdelta.runtime import MultiTenantModel, left_padded
from qdelta.sources import load_hf_model
from qdelta.store import DeltaStore

#: The tenant name that stands for the base model alone.
BASE_ROW = "-"


def rows_of(tenants: list[str], prompts: list[str]) -> list[tuple[str | None, str]]:
    """``(tenant or None for the base, prompt)`` per batch row: one prompt serves every
    tenant, or one prompt per tenant, paired in order."""
    if len(prompts) not in (1, len(tenants)):
        raise ShapeError(
            f"--prompt: expected one prompt, or one per --tenant ({len(tenants)}), "
            f"found {len(prompts)}"
        )
    if len(prompts) == 1:
        prompts = prompts * len(tenants)
    return [(None if t == BASE_ROW else t, p) for t, p in zip(tenants, prompts, strict=True)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ShapeError(f"--prompt {text!r}: expected at least one token, found none")
    return ids


def run_generate(args: argparse.Namespace) -> int:
    store_dir = Path(args.store)
    if not store_dir.is_dir():
        raise FileError(f"{store_dir}: expected a delta store directory, found none")
    base = load_hf_model(args.base)
    tokenizer = local_tokenizer([args.base], base, "qdelta generate", FileError)
    rows = rows_of(args.tenant, args.prompt)
    served = MultiTenantModel(base, DeltaStore(store_dir))
    encoded = [_encode(tokenizer, p) for _, p in rows]
    pad = getattr(tokenizer, "pad_token_id", None)
    ids, mask = left_padded(encoded, 0 if pad is None else int(pad))
    eos = getattr(tokenizer, "eos_token_id", getattr(tokenizer, "eos_id", None))
    out = served.generate(
        ids,
        [t for t, _ in rows],
        args.max_new_tokens,
        attention_mask=mask,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_token_id=None if eos is None else int(eos),
    )
    results = [
        {
            "tenant": tenant if tenant is not None else BASE_ROW,
            "prompt": prompt,
            "completion": tokenizer.decode(out.tokens[i].tolist()),
            "tokens": out.tokens[i].tolist(),
        }
        for i, (tenant, prompt) in enumerate(rows)
    ]
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
    else:
        for r in results:
            print(f"[{r['tenant']}] {r['prompt']}{r['completion']}")
    return 0
