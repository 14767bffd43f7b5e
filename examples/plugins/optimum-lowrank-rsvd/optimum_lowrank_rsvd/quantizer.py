"""The quantizer: dynamic int8 with one scale per weight tensor."""

from __future__ import annotations

from optimum_lowrank import QuantizationRequest, Quantizer, hookimpl


class PerTensorInt8Quantizer(Quantizer):
    """Dynamic int8 with one scale per weight tensor (ONNX Runtime's ``quantize_dynamic``, ``per_channel=False``).

    Smaller scale tables than the built-in ``dynamic_int8`` (per channel) at some cost in
    accuracy; here to show the ``lowrank_register_quantizers`` hook.
    """

    name = "int8_per_tensor"
    summary = "dynamic int8, one scale per weight tensor"

    def quantize(self, onnx_path, output_path, request: QuantizationRequest) -> dict:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(onnx_path), str(output_path), per_channel=False, reduce_range=request.reduce_range,
            weight_type=QuantType.QInt8, nodes_to_exclude=list(request.exclude_nodes),
            use_external_data_format=request.external_data,
        )
        return {"per_channel": False}


@hookimpl
def lowrank_register_quantizers(register) -> None:
    register(PerTensorInt8Quantizer)
