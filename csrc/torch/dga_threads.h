// The thread pool of the PyTorch binding: dga::ParallelFor on at::get_num_threads() threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// Work items handed out one at a time to at::get_num_threads() threads (the caller and fresh
// std::threads: ATen's OpenMP pool is not reachable from an extension built without -fopenmp).
// The first exception a work item throws (e.g. std::bad_alloc) stops the hand-out and is
// rethrown in the caller, where the binding turns it into a Python error.
void parallel_for(size_t total, const std::function<void(size_t)>& body) {
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    try {
      for (size_t i; (i = next.fetch_add(1)) < total;) body(i);
    } catch (...) {
      next = total;
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(total));
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < workers; ++t) threads.emplace_back(work);
  work();
  for (std::thread& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace
