"""One exception hierarchy for everything gguf-stream raises on purpose."""


class GGUFStreamError(Exception):
    """Root of all gguf-stream errors."""


class ModelFileError(GGUFStreamError, ValueError):
    """The model file is missing, not a GGUF file, or damaged."""


class UnsupportedModelError(GGUFStreamError, ValueError):
    """The architecture's graph cannot be streamed layer by layer."""


class BudgetError(GGUFStreamError, ValueError):
    """The VRAM budget cannot hold the minimum the model needs, or exceeds the device."""


class HostMemoryError(BudgetError):
    """The run needs more host memory (pinned streamed parts, CPU layers' copies) than is available."""


class EnvironmentMismatchError(GGUFStreamError, RuntimeError):
    """Wrong llama-cpp-python version or build (e.g. no CUDA where a GPU budget was asked for)."""


class NativeError(GGUFStreamError, RuntimeError):
    """A call into the native helper, ggml or CUDA failed; the message names the call."""

    def __init__(self, call: str, code: int, detail: str):
        self.call, self.code, self.detail = call, code, detail
        super().__init__(f"{call} failed ({code}): {detail}")


class DecodeError(GGUFStreamError, RuntimeError):
    """llama_decode failed or the streaming hook recorded an error during it."""
