// ImageNet-pretrained weights for the ResNet backbone: torchvision's ResNet50 state_dict, timm's
// `resnet50.tv_in1k` (the same file, torchvision's IMAGENET1K_V1 weights; scripts/download_resnet50.sh
// fetches it) or the backbone of an mdff checkpoint, read from a safetensors file by PyTorch name.
#pragma once
#include <string>
#include <vector>

#include "models/resnet.h"

namespace mdff {

// What load_pretrained_backbone did, for a program to print.
struct PretrainedReport {
  std::string path;
  int64_t loaded = 0;                // backbone parameters and buffers set from the file
  std::vector<std::string> ignored;  // the file's tensors that were not needed, by their names in the file
  // One line: "PATH: loaded 265 backbone tensors, ignored 55 (fc.weight, fc.bias, 53 num_batches_tracked)".
  std::string summary() const;
};

// Sets every parameter and buffer of `backbone` (e.g. MdffSh::backbone()) from the safetensors file at
// `path`, converting F32, F16, BF16 and F64 values to the backbone's dtype and copying them to its device
// in place: the parameters stay the same leaves that require grad, so optimizers built on them still hold.
//
// Names are torchvision's ("layer1.0.downsample.1.running_var"), optionally prefixed "module."
// (DataParallel). A file whose names start with "backbone." is an mdff checkpoint: those tensors are the
// backbone and the others (the MDFF-SH head, training state) are ignored. Also ignored: "num_batches_tracked" counters and
// the ImageNet classifier fc.weight and fc.bias when the backbone has no `fc`.
//
// Everything is checked before anything is copied, so on an error the backbone is unchanged. mdff::Error
// names the file and every problem: the backbone tensors missing from the file, shapes that differ (both
// shapes), tensors the backbone does not have, non-floating dtypes; each with how many. A file that is not
// safetensors gives io::load_safetensors's error.
PretrainedReport load_pretrained_backbone(ResNet& backbone, const std::string& path);

}  // namespace mdff
