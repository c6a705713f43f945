"""Schemas of the onnxruntime contrib ops (domain ``com.microsoft``) headsmith's ONNX lowering emits.

onnx itself knows no onnxruntime contrib ops; each schema (inputs, outputs and attributes as in onnxruntime's
ContribOperators.md) is registered once per process, so onnxscript can build the nodes and ``onnx.checker``
can validate the graphs:

- ``GroupQueryAttention``: attention with a KV cache appended in place (onnx_ops.py);
- ``SkipSimplifiedLayerNormalization``: residual add + RMSNorm (onnx_ops.py);
- ``MatMulNBits`` / ``GatherBlockQuantized``: linears and embedding lookups over block-quantised weights
  (onnx_quant.py).
"""

from __future__ import annotations

from typing import Any

_OPSET: Any = None


def contrib_opset() -> Any:
    """An onnxscript opset for ``com.microsoft`` v1 with the schemas above registered."""
    global _OPSET
    if _OPSET is not None:
        return _OPSET
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, INT, FLOAT = OpSchema.Attribute, OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT  # noqa: N806
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = [
        OpSchema(
            "GroupQueryAttention", "com.microsoft", 1, "grouped-query attention with a KV cache",
            inputs=[fp("query", "T"), fp("key", "T", param_option=opt), fp("value", "T", param_option=opt),
                    fp("past_key", "T", param_option=opt), fp("past_value", "T", param_option=opt),
                    fp("seqlens_k", "M"), fp("total_sequence_length", "M"),
                    fp("cos_cache", "T", param_option=opt), fp("sin_cache", "T", param_option=opt),
                    fp("position_ids", "P", param_option=opt), fp("attention_bias", "T", param_option=opt)],
            outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
            type_constraints=[("T", floats, "float types"), ("M", ["tensor(int32)"], "lengths"),
                              ("P", ["tensor(int64)"], "positions")],
            attributes=[attr("num_heads", INT, "query heads"), attr("kv_num_heads", INT, "key/value heads"),
                        attr("scale", FLOAT, "softmax scale", required=False),
                        attr("softcap", FLOAT, "score softcap", required=False),
                        attr("local_window_size", INT, "sliding window (-1: none)", required=False),
                        attr("do_rotary", INT, "apply rotary inside", required=False),
                        attr("rotary_interleaved", INT, "interleaved rotary", required=False),
                        attr("smooth_softmax", INT, "smooth softmax", required=False)]),
        OpSchema(
            "SkipSimplifiedLayerNormalization", "com.microsoft", 1, "residual add followed by RMSNorm",
            inputs=[fp("input", "T"), fp("skip", "T"), fp("gamma", "T"), fp("bias", "T", param_option=opt)],
            outputs=[fp("output", "T"), fp("mean", "U", param_option=opt), fp("inv_std_var", "U", param_option=opt),
                     fp("input_skip_bias_sum", "T", param_option=opt)],
            type_constraints=[("T", floats, "float types"), ("U", ["tensor(float)"], "statistics")],
            attributes=[attr("epsilon", FLOAT, "epsilon", required=False)]),
        OpSchema(
            "MatMulNBits", "com.microsoft", 1, "matmul with block-quantised weights",
            inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"), fp("zero_points", "T3", param_option=opt),
                    fp("g_idx", "T4", param_option=opt), fp("bias", "T1", param_option=opt)],
            outputs=[fp("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "float"),
                              ("T2", ["tensor(uint8)"], "packed codes"),
                              ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points"),
                              ("T4", ["tensor(int32)"], "group index")],
            attributes=[attr("K", INT, "input features"), attr("N", INT, "output features"),
                        attr("bits", INT, "bits per weight"), attr("block_size", INT, "block size"),
                        attr("accuracy_level", INT, "compute precision", required=False)]),
        OpSchema(
            "GatherBlockQuantized", "com.microsoft", 1, "gather of block-quantised rows",
            inputs=[fp("data", "T1"), fp("indices", "Tind"), fp("scales", "T2"),
                    fp("zero_points", "T1", param_option=opt)],
            outputs=[fp("output", "T2")],
            type_constraints=[("T1", ["tensor(uint8)"], "packed codes"),
                              ("T2", ["tensor(float)", "tensor(float16)"], "float"),
                              ("Tind", ["tensor(int32)", "tensor(int64)"], "indices")],
            attributes=[attr("gather_axis", INT, "gather axis", required=False),
                        attr("quantize_axis", INT, "quantize axis", required=False),
                        attr("block_size", INT, "block size", required=False),
                        attr("bits", INT, "bits per weight", required=False)]),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, 1, "com.microsoft")
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
    _OPSET = onnxscript.values.Opset("com.microsoft", 1)
    return _OPSET
