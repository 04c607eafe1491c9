"""The XLA flags the suite compiles with, and the environment of a process that compiles
as users do (for the bit-for-bit claims, which must hold at the level users get)."""

import importlib.util
import mmap
import os
import pathlib


def xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has the flag ``flag`` (an unknown flag in XLA_FLAGS aborts
    the process), read off its shared libraries without starting JAX."""
    spec = importlib.util.find_spec("jaxlib")
    for lib in pathlib.Path(spec.origin).parent.glob("*.so"):
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(flag.encode() + b"\0") >= 0:
                return True
    return False


# backend optimisation level 0, and XLA's older loop emitters, not its MLIR fusion emitters:
# at level 0 they compile the market's programs in half the time (where this XLA has them)
TEST_FLAGS = ["--xla_backend_optimization_level=0"]
if xla_knows("xla_cpu_use_fusion_emitters"):
    TEST_FLAGS.append("--xla_cpu_use_fusion_emitters=false")


def user_env(env=None) -> dict:
    """``env`` (default ``os.environ``) with the suite's own XLA flags taken out."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f not in TEST_FLAGS]
    env["XLA_FLAGS"] = " ".join(flags)
    return env
