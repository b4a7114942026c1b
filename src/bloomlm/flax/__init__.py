"""BLOOM in JAX/Flax: `bloomlm.flax.pretrained` holds the user-facing classes (also exported from
`bloomlm`).

model.py       linen modules, parameter tree = transformers' Flax BLOOM tree; the empty cache
               (make_cache) and the one module per settings the jitted functions share
pretrained.py  FlaxBloomModel and the heads: params, checked __call__, init_cache,
               from/save_pretrained
checks.py      input checks at the API boundary
outputs.py     output dataclasses (pytrees; attribute, key and index access)
weights.py     PyTorch state dict <-> Flax tree (a table), stacking layers for scan_layers
files.py       flax_model.msgpack (and shards) in and out of a folder
losses.py      the heads' losses (`bloomlm.flax_losses`)
generate.py    jitted greedy / sampling / beam search
"""

try:  # jax and flax are an optional extra: say how to get them instead of a bare ImportError
    import flax  # noqa: F401
    import jax  # noqa: F401
except ImportError as err:
    if err.name not in ("jax", "jaxlib", "flax"):
        raise
    raise ImportError(
        f"bloomlm's Flax classes need jax and flax ({err.name} is not installed): "
        'pip install "bloomlm[flax]"'
    ) from err
