"""The op-class mapping of tools/profile_step.py on real event names of both profilers; no
profiling is run."""
from tools import profile_step as ps


def test_tf_kernel_events_by_class():
    tape = "StatefulPartitionedCall/gradient_tape/resnet20_1/"
    fwd = "StatefulPartitionedCall/resnet20_1/"
    assert ps.tf_class(fwd + "stage1_block1_conv1_1/convolution:_MklNativeConv2D") == "conv fwd"
    assert ps.tf_class(tape + "s3_conv2_1/convolution/Conv2DBackpropInput:"
                              "_MklNativeConv2DBackpropInput") == "conv input-grad"
    assert ps.tf_class(tape + "s3_conv2_1/convolution/Conv2DBackpropFilter:"
                              "_MklNativeConv2DBackpropFilter") == "conv filter-grad"
    assert ps.tf_class(fwd + "s1_conv1_norm_1/FusedBatchNormV3:_MklNativeFusedBatchNormEx") \
        == "BN fwd"
    assert ps.tf_class(fwd + "s1_conv1_norm_1/add_1:AddV2") == "BN fwd"  # moving average
    assert ps.tf_class(tape + "s1_conv1_norm_1/FusedBatchNormGradV3:FusedBatchNormGradV3") \
        == "BN bwd"
    assert ps.tf_class(tape + "s3_relu_1/ReluGrad:ReluGrad") == "relu"
    assert ps.tf_class(fwd + "s3_conv1_pad_1/Pad:Pad") == "pad/slice"
    assert ps.tf_class("StatefulPartitionedCall/sgd/AssignSubVariableOp_5:AssignSubVariableOp") \
        == "update"
    assert ps.tf_class("StatefulPartitionedCall/AddN_1:AddN") == "add"
    assert ps.tf_class(fwd + "logits_1/BiasAdd:_MklNativeFusedMatMul") == "matmul"
    for framework_event in ("ExecutorState::Process", "EagerLocalExecute: __inference_f_1",
                            "MakeIterator::RootDataset"):
        assert ps.tf_class(framework_event) is None


def test_torch_events_by_class():
    assert ps.torch_class("aten::mkldnn_convolution") == "conv fwd"
    assert ps.torch_class("aten::convolution_backward") == "conv bwd (input+filter)"
    assert ps.torch_class("aten::native_batch_norm_backward") == "BN bwd"
    assert ps.torch_class("aten::threshold_backward") == "relu"
    assert ps.torch_class("aten::_foreach_add_") == "update"
    assert ps.torch_class("aten::constant_pad_nd") == "pad/slice"
    assert ps.torch_class("aten::addmm") == "matmul"
    assert ps.torch_class("aten::add") == "add"
    assert ps.torch_class("aten::add_") == "update"
    assert ps.torch_class("NativeBatchNormBackward0") == "BN bwd"
    assert ps.torch_class("ConvolutionBackward0") == "conv bwd (input+filter)"


def test_summed_drops_unclassified():
    assert ps.summed([("relu", 1.0), (None, 5.0), ("relu", 0.5)]) == {"relu": 1.5}
