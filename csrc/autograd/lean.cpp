#include "lean.h"

#include <unordered_map>

namespace pyfast::autograd::lean {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  WeakImpl activation;  // weak: a record does not keep its activation alive
  int64_t version;
  Recipe recipe;
};

// One training forward's records, on the thread that runs it (as the saved-tensor hooks are per thread).
thread_local bool on = false;
thread_local std::unordered_map<const c10::TensorImpl*, Entry> entries;

}  // namespace

void set_recording(bool recording) {
  on = recording;
  if (!recording) entries.clear();
}

bool recording() { return on; }

void record(const at::Tensor& activation, Recipe recipe) {
  if (!on) return;
  entries.insert_or_assign(activation.unsafeGetTensorImpl(),
                           Entry{WeakImpl(activation.getIntrusivePtr()), activation._version(), std::move(recipe)});
}

std::optional<Recipe> take(const at::Tensor& t) {
  const auto found = entries.find(t.unsafeGetTensorImpl());
  if (found == entries.end()) return std::nullopt;
  const auto alive = found->second.activation.lock();
  if (alive.get() != t.unsafeGetTensorImpl() || t._version() != found->second.version) return std::nullopt;
  auto recipe = std::move(found->second.recipe);
  entries.erase(found);
  return recipe;
}

}  // namespace pyfast::autograd::lean
