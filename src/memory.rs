//! Keep the process's memory what it uses. An apply allocates and frees buffers of a few MiB
//! (chunks, delta prefixes) over and over; glibc raises its mmap threshold after the first
//! such free, and from then on serves them from heap arenas that do not shrink, so resident
//! memory would grow to many times what is live. A fixed threshold keeps every large buffer
//! in its own mapping, returned to the system when freed.

/// Set the allocator up (glibc); a no-op elsewhere. Call once, first thing in `main`.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before any other
        // thread exists, and both values are valid for glibc.
        unsafe {
            nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 128 * 1024);
            // Per-thread arenas each keep their own free memory; two are enough here.
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
        }
    }
}
