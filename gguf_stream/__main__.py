"""``python -m gguf_stream ...`` is the ``gguf-stream`` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
