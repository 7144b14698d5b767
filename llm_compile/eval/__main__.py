"""``python -m llm_compile.eval``: see :mod:`llm_compile.eval.cli`."""
import sys

from .cli import main

sys.exit(main())
