"""Ring attention: blockwise exact attention over a sequence split across ranks.

See docs/RING.md. Modules: block (one block pair -> (out, lse)), merge (exact
partial merge), comm (ring point-to-point), layout (shards and positions),
attention (ring and virtual ring with autograd), ffn (blockwise feed-forward),
hf (Hugging Face Llama attention as ring attention), launch (spawn a local ring).
"""

from qdelta.ring.attention import ring_attention, virtual_ring_attention
from qdelta.ring.block import block_attention, block_attention_backward
from qdelta.ring.comm import RingComm
from qdelta.ring.errors import RingBackendWarning, RingError
from qdelta.ring.ffn import blockwise_feedforward
from qdelta.ring.layout import position_ids, rank_chunks, shard, unshard
from qdelta.ring.merge import merge

__all__ = [
    "RingBackendWarning",
    "RingComm",
    "RingError",
    "block_attention",
    "block_attention_backward",
    "blockwise_feedforward",
    "merge",
    "position_ids",
    "rank_chunks",
    "ring_attention",
    "shard",
    "unshard",
    "virtual_ring_attention",
]
