//! How the daemon asks the C allocator to treat large buffers.

/// Keeps large freed buffers for reuse instead of giving them back to the
/// kernel (docs/performance.md, "Replication throughput").
///
/// Every tap write arrives in a buffer of its own (up to 32 MiB) that lives
/// until the target acknowledges the write. glibc serves a buffer above its
/// mmap threshold with a fresh mapping and trims its heaps when their free
/// top grows, so nearly every write's buffer was memory the kernel had to
/// fault in and zero, 4 KiB at a time: about a sixth of the protected
/// VDSA's CPU in the replication benchmark. Served from the heap, with up
/// to 256 MiB of free heap kept, the buffers are reused. The resident size
/// stays near its peak instead of shrinking, and the peak itself grows a
/// little: freed heap does not always fit a buffer of another size.
///
/// One arena for every thread: glibc gives threads arenas of their own
/// (up to eight per core), made of 64 MiB heaps, and unmaps a heap as
/// soon as it is wholly free, whatever the trim threshold. The buffers a
/// source reads back from its spill on one thread and frees on another
/// kept emptying such heaps: 25,000 page faults a second during
/// replication, 77 with one arena (docs/performance.md, "One malloc
/// arena"). Small allocations still come from each thread's cache
/// without the arena's lock.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets the allocator's parameters; it is
        // called before the daemon starts any thread, and every value is
        // within what glibc accepts (at most 32 MiB for the threshold on a
        // 64-bit build; glibc refuses larger ones by returning 0).
        let set = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        };
        if !set {
            tracing::debug!("the allocator kept its defaults for large buffers");
        }
    }
}
