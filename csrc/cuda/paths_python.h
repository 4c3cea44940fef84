// Python bindings of the CUDA dispatch rule (paths.h): the forced path, the threshold table, the
// precision column a dtype takes (precision.h), and the rule itself. Bound into dynnet_ext._C (ops.cpp: on every build, so the rule can be read and
// tested on a machine without a GPU) and into the CPU harness's module (its own copy of the
// state, for the launchers it runs). dynnet_ext.ops wraps them (cuda_path, set_cuda_path,
// cuda_dispatch_table, set_cuda_dispatch_table).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "paths.h"
#include "precision.h"

namespace dynnet::paths {

inline Precision parse_precision(const std::string& name) {
  for (int i = 0; i < kNumPrecisions; ++i)
    if (name == kPrecisionNames[i]) return static_cast<Precision>(i);
  throw pybind11::value_error("dynnet: precision must be one of float64, float32, tf32, float16, bfloat16; got '" +
                              name + "'");
}

inline pybind11::dict per_precision_dict(const PerPrecision& v) {
  pybind11::dict d;
  for (int i = 0; i < kNumPrecisions; ++i) d[kPrecisionNames[i]] = v[i];
  return d;
}

inline pybind11::dict table_dict(const Table& t) {
  pybind11::dict d;
  d["layer_forward_custom_max_flops"] = per_precision_dict(t.layer_forward_custom_max_flops);
  d["layer_backward_custom_max_flops"] = per_precision_dict(t.layer_backward_custom_max_flops);
  d["net_one_launch_max_flops"] = per_precision_dict(t.net_one_launch_max_flops);
  d["wide_tile_min_tiles"] = t.wide_tile_min_tiles;
  d["lt_relu_keeps_nan"] = t.lt_relu_keeps_nan;
  return d;
}

// Sets the entries `changes` names (a dict shaped like table_dict, any subset); an unknown key
// or precision is an error and changes nothing.
inline Table table_with(const Table& base, const pybind11::dict& changes) {
  Table t = base;
  const auto per_precision = [](PerPrecision& v, const pybind11::handle& d, const std::string& key) {
    if (!pybind11::isinstance<pybind11::dict>(d)) {
      throw pybind11::type_error("dynnet: " + key + " must be a dict {precision: flops}");
    }
    for (const auto& [k, x] : d.cast<pybind11::dict>()) {
      const double value = x.cast<double>();
      if (!(value >= 0)) throw pybind11::value_error("dynnet: " + key + " values must be >= 0");
      v[static_cast<int>(parse_precision(k.cast<std::string>()))] = value;
    }
  };
  for (const auto& [k, v] : changes) {
    const std::string key = k.cast<std::string>();
    if (key == "layer_forward_custom_max_flops") {
      per_precision(t.layer_forward_custom_max_flops, v, key);
    } else if (key == "layer_backward_custom_max_flops") {
      per_precision(t.layer_backward_custom_max_flops, v, key);
    } else if (key == "net_one_launch_max_flops") {
      per_precision(t.net_one_launch_max_flops, v, key);
    } else if (key == "wide_tile_min_tiles") {
      t.wide_tile_min_tiles = v.cast<double>();
    } else if (key == "lt_relu_keeps_nan") {
      if (!pybind11::isinstance<pybind11::bool_>(v)) throw pybind11::type_error("dynnet: lt_relu_keeps_nan must be a bool");
      t.lt_relu_keeps_nan = v.cast<bool>();
    } else {
      throw pybind11::key_error("dynnet: the CUDA dispatch table has no entry '" + key +
                                "' (layer_forward_custom_max_flops, layer_backward_custom_max_flops, "
                                "net_one_launch_max_flops, wide_tile_min_tiles, lt_relu_keeps_nan)");
    }
  }
  return t;
}

inline void bind(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cuda_path", [] {
    try {
      return std::string(path_name(forced_path()));
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, "the forced CUDA path: auto, custom or vendor (DYNNET_EXT_CUDA_PATH at load)");
  m.def("set_cuda_path", [](const std::string& name) {
    Path p;
    try {
      p = parse_path(name);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
    return std::string(path_name(set_forced_path(p)));
  }, py::arg("path"), "force a CUDA path (auto, custom, vendor); returns the previous one");
  m.def("cuda_dispatch_table", [] { return table_dict(table()); }, "the live CUDA dispatch table");
  m.def("cuda_default_dispatch_table", [] { return table_dict(kDefaultTable); },
        "the CUDA dispatch table's defaults in the source (csrc/cuda/paths.h)");
  m.def("set_cuda_dispatch_table", [](const py::dict& changes) {
    const py::dict previous = table_dict(table());
    table() = table_with(table(), changes);
    return previous;
  }, py::arg("changes"), "change entries of the live CUDA dispatch table; returns the previous table");
  m.def("reset_cuda_dispatch_table", [] { table() = kDefaultTable; }, "back to the source's defaults");
  m.def("cuda_gemm_precision", [](const std::string& dtype) {
    static const std::pair<const char*, at::ScalarType> kDtypes[] = {
        {"float64", at::kDouble}, {"float32", at::kFloat}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}};
    for (const auto& [name, t] : kDtypes)
      if (dtype == name) return std::string(kPrecisionNames[index(dynnet::gemm_precision(t))]);
    throw py::value_error("dynnet: no CUDA kernels for " + dtype + " (float64, float32, float16, bfloat16)");
  }, py::arg("dtype"), "the dispatch table's column for a dtype's GEMMs now (float32: tf32 where torch allows TF32)");
  m.def("cuda_choose_layer", [](const std::string& precision, int64_t M, int64_t K, int64_t N, bool backward) {
    try {
      return std::string(path_name(choose_layer(parse_precision(precision), M, K, N, backward)));
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("precision"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("backward"),
        "the path a layer op takes: custom or vendor");
  m.def("cuda_choose_net", [](const std::string& precision, int64_t M, int64_t D_in, int64_t H, int64_t D_out,
                              int64_t depth) {
    try {
      return std::string(choose_net(parse_precision(precision), M, D_in, H, D_out, depth) == NetPath::OneLaunch
                             ? "one-launch"
                             : "chain");
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("precision"), py::arg("M"), py::arg("D_in"), py::arg("H"), py::arg("D_out"), py::arg("depth"),
        "the path a network op takes: one-launch or chain");
}

}  // namespace dynnet::paths
