"""``python -m llm_compile.runtime.offload``: run one attention worker rank (see
:mod:`llm_compile.runtime.offload.workers`)."""
import sys

from llm_compile.runtime.offload.workers import main

sys.exit(main())
