"""ONNX export of Mixtral / Mistral artifacts, and running the result with onnxruntime.

    from mixtral_quant.export import ExportDtype, Target, export_onnx
    export_onnx(Path("exports/tiny-gptq"), Path("exports/tiny-gptq-onnx"), Target.ORT, ExportDtype.FP32)

``Target.ORT`` uses onnxruntime contrib ops (GroupQueryAttention, MoE/QMoE, MatMulNBits,
MatMulBnb4); ``Target.STANDARD`` uses ai.onnx ops only, with quantized weights dequantized. The
graph I/O names below are what onnxruntime-genai's genai_config.json must list.
"""

from mixtral_quant.export.common import (
    ATTENTION_MASK,
    DATA_FILE,
    EXPORT_INFO,
    INPUT_IDS,
    LOGITS,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    ExportDtype,
    NF4Experts,
    Target,
)
from mixtral_quant.export.mixtral import export_onnx
from mixtral_quant.export.record import export_summary

__all__ = [
    "ATTENTION_MASK",
    "DATA_FILE",
    "EXPORT_INFO",
    "INPUT_IDS",
    "LOGITS",
    "MODEL_FILE",
    "PAST_KEY",
    "PAST_VALUE",
    "PRESENT_KEY",
    "PRESENT_VALUE",
    "ExportDtype",
    "NF4Experts",
    "Target",
    "export_onnx",
    "export_summary",
]
