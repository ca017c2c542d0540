//! Links libtorch so that CUDA does not silently disappear (the CUDA link trap): rustc
//! links with `--as-needed`, which drops `libtorch_cuda.so` unless `libtorch.so` is forced
//! in, and torch-sys's own rpath never reaches this binary.

fn main() {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
