// The extension module protege.engine._C: each concept lives in its own .cpp and registers itself here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_packer(py::module_& m);
void bind_block_manager(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "Protégé engine native code (sequence packer, KV block manager).";
  bind_packer(m);
  bind_block_manager(m);
}
