/// mimalloc instead of glibc's malloc: the request path allocates and frees many small blocks
/// (headers, futures, buffers); see BENCHMARKS.md, "Per-change table".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    coatcheck::cli::main()
}
