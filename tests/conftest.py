"""Test configuration: 8 simulated CPU devices for the sharded tests.

XLA reads the flag when the backend initialises, so it is set here, before any
test module imports JAX.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
