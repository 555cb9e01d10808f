"""The process-wide memory tuning every command applies before torch computes."""

import os
import subprocess
import sys

from latentwire.memory import KERNEL_CACHE


def _capacity_seen(env: dict) -> str:
    code = ("import os; from latentwire.memory import keep_freed_memory; keep_freed_memory(); "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_kernel_cache_is_bounded_unless_the_user_set_it():
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert _capacity_seen(env) == KERNEL_CACHE
    assert _capacity_seen({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}) == "512"
