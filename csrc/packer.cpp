// Sequence packer: assign variable-length sequences to bins of a fixed token budget (no padding inside a
// bin; the unused tail of each bin is the waste). Best-fit decreasing: sequences longest first, each into
// the fullest bin that still has room. O(n log n) with an ordered multiset of remaining capacities.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

namespace {

std::vector<std::vector<int64_t>> pack_best_fit_decreasing(const std::vector<int64_t>& lengths,
                                                           int64_t budget) {
  if (budget <= 0) throw std::invalid_argument("token budget must be positive, got " + std::to_string(budget));
  const int64_t n = static_cast<int64_t>(lengths.size());
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) + "; lengths must be positive");
    if (lengths[i] > budget)
      throw std::invalid_argument("sequence " + std::to_string(i) + " has length " +
                                  std::to_string(lengths[i]) + " > token budget " + std::to_string(budget));
  }
  // Longest first; ties by index so the result is deterministic (resume depends on it).
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });

  std::vector<std::vector<int64_t>> bins;
  std::set<std::pair<int64_t, int64_t>> room;  // (remaining capacity, bin index)
  for (int64_t i : order) {
    // Fullest bin that fits: the smallest remaining capacity >= length.
    auto it = room.lower_bound({lengths[i], -1});
    if (it == room.end()) {
      bins.push_back({i});
      room.insert({budget - lengths[i], static_cast<int64_t>(bins.size()) - 1});
    } else {
      auto [left, b] = *it;
      room.erase(it);
      bins[b].push_back(i);
      room.insert({left - lengths[i], b});
    }
  }
  return bins;
}

}  // namespace

void bind_packer(py::module_& m) {
  m.def("pack_sequences", &pack_best_fit_decreasing, py::arg("lengths"), py::arg("budget"),
        "Best-fit-decreasing bin packing: returns bins as lists of sequence indices (bins in creation "
        "order, longest sequence first within a bin). Raises ValueError on a length <= 0 or > budget.");
}
