"""What the embedded engine imports: llama-cpp-python's ctypes bindings, not its
high-level package (`native._bindings`)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_engine_loads_only_llama_cpp_s_bindings_and_leaves_the_whole_package_importable() -> None:
    """The high-level package (its `Llama`, jinja2, diskcache) is resident memory the
    server never uses; a later `import llama_cpp` in the same process must still work."""
    code = (
        "import json, sys\n"
        "import tcserve.engines.llamacpp.engine\n"
        "from tcserve.engines.llamacpp import native\n"
        "loaded = [m for m in ('llama_cpp.llama', 'jinja2', 'diskcache') if m in sys.modules]\n"
        "from llama_cpp import Llama\n"
        "import llama_cpp\n"
        "print(json.dumps([loaded, native.llama.__name__, llama_cpp.llama_cpp is native.llama, Llama.__name__]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[], "llama_cpp.llama_cpp", True, "Llama"]
