"""pd-serve: prefill/decode-disaggregated LLM serving.

The offline API lives here (`LLM`, `SamplingParams`); everything heavy is imported on first use so
that `import pd_serve` and `pd-serve --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from pd_serve.engine.llm import LLM
    from pd_serve.engine.outputs import RequestOutput
    from pd_serve.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pd_serve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pd_serve.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "RequestOutput":
        from pd_serve.engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(f"module 'pd_serve' has no attribute {name!r}")
