"""Wall time and peak memory of one measured block: this process's peak RSS on a CPU, the CUDA
allocator's peak on a GPU."""

from __future__ import annotations

import gc
import re
import threading
import time

import psutil
import torch


class Meter:
    """`with Meter(device) as m:` times the block (`m.wall`, once the device has finished its
    work) and keeps its peak memory in bytes (`m.peak`) and the memory held as it began
    (`m.start`). On Linux the kernel keeps the RSS peak itself (VmHWM) and resets it on request
    (`clear_refs` = 5), so nothing polls while the timed code runs; elsewhere a thread samples
    RSS every 5 ms (which costs the timed code a little)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.proc = psutil.Process()
        self.sampler = None

    @staticmethod
    def rss_high_water_mark() -> int:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

    def sample_rss(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self.proc.memory_info().rss
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.rss_high_water_mark()
            except OSError:
                self.stop = threading.Event()
                self.sampler = threading.Thread(target=self.sample_rss, daemon=True)
                self.sampler.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.t0
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        elif self.sampler is None:
            self.peak = max(self.peak, self.rss_high_water_mark())
        else:
            self.stop.set()
            self.sampler.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def figures(self, capture: bool = False) -> dict:
        """`peak_rss` (and with `capture`, `capture_rss`: the growth over the block) on a CPU;
        `peak_gpu` on a GPU, where a capture figure is a run with capture less one without."""
        if self.device == "cuda":
            return {"peak_gpu": self.peak}
        return {"peak_rss": self.peak, **({"capture_rss": self.peak - self.start} if capture else {})}
