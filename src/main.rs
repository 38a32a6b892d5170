/// mimalloc instead of glibc's malloc: the request path allocates and frees many small blocks
/// (headers, futures, buffers); see BENCHMARKS.md, "Per-change table". Its v2 line (Cargo feature
/// `v2`): the `mimalloc` crate passes every Rust allocation to `mi_malloc_aligned`, which in v3
/// takes a slow, over-allocating path for every block whose size is not a power of two (a 48-byte
/// block costs 64), while v2 serves any alignment up to 16 from its ordinary size classes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coatcheck::cli::main()
}
