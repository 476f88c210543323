"""The maths, written once against an array namespace ``xp`` (NumPy, ``jax.numpy`` or the torch shim)."""
