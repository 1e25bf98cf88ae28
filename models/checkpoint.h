// Loading a train_mdff checkpoint (checkpoint_{L}bits.safetensors) back into a model, for tools that
// encode images with a trained network (mdff_search). The file holds every parameter and buffer by its
// PyTorch name, with the metadata "config" (the run's config.json) and "bits" (the code length L); the
// MdffSh is rebuilt from that metadata and each tensor is loaded by name.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/safetensors.h"
#include "data/batch.h"
#include "layers/module.h"
#include "models/mdff.h"

namespace mdff {

// The model train_mdff builds from its options: backbone "resnet50" or "tiny" (ResNetConfig::tiny()),
// code length `bits`, `classes` (K), taps "all" | "fc1" | "convs" and the scales. A bad value is an
// error naming it. (train_mdff could build its models with this too.)
MdffConfig mdff_config(const std::string& backbone, int bits, int classes, const std::string& taps,
                       const std::vector<double>& scales);

// What a checkpoint holds: every parameter, then every buffer, by name (handles into the model).
NamedTensors model_state(const Module& model);

// Copies every parameter and buffer of `model` from `file` by name, onto the model's device. Tensors named
// "optimizer.*" or "trainer.*" (training state, Trainer::save_state) are skipped; a tensor of `file` the
// model does not have, or one of the model's that is missing or of another shape, is an error naming it,
// `source` (the file's path) and `model_name` (what the model is, for the reader of the error).
void load_model_state(Module& model, const io::SafetensorsFile& file, const std::string& source = "the checkpoint",
                      const std::string& model_name = "the model");

struct LoadedCheckpoint {
  std::unique_ptr<MdffSh> model;  // on the CPU, in evaluation mode
  data::BatchOptions batch;       // how to prepare its input: the run's image size or crop mode (the centre
                                  //   crop), no augmentation
  int classes = 0;                // K, the classifier's outputs (the training dataset's labels)
  std::string backbone;           // "resnet50" or "tiny"
};

// Reads a checkpoint written by train_mdff and returns its model. The metadata must hold "bits" and
// "config" with "model", "classes", "taps", "scales" and "image_size", and may hold "resize" and "crop"
// (crop mode when both are positive; absent from runs before train_mdff had them); every parameter and
// buffer of that model must be in the file with its shape (load_model_state). A model beyond train_mdff's
// limits (more than 1024 bits or 10000 classes, image sizes over 1024, scales outside (0, 4]) is refused
// before it is built. Each error names the file and the tensor or metadata key.
LoadedCheckpoint load_model_checkpoint(const std::string& path);

}  // namespace mdff
