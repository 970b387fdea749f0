"""Python side of the custom kernels of `specee::exit_score`.

    triton_exit_score   the fused Triton kernel (CUDA impl of the torch op, AOT PTX compile)
    trt_exit_plugin     the op as a TensorRT quickly-deployable plugin (QDP) whose AOT implementation
                        is that kernel's PTX, compiled ahead of time with no GPU

Nothing here is imported eagerly: triton and tensorrt are optional.
"""
