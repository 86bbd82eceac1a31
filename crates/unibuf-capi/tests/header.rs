//! The committed C header is what cbindgen makes of the code: regenerated here, in memory, and
//! compared. `cargo test --workspace` (CI) therefore fails when the API changed without the
//! header.

use std::path::Path;

#[test]
fn header_matches_the_code() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");
    let path = crate_dir.join("include").join("unibuf.h");
    if std::env::var_os("UNIBUF_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/unibuf.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "{} is out of date with the code (first difference at line {}: committed {:?}, \
             generated {:?}).\nRegenerate it with: UNIBUF_BLESS=1 cargo test -p unibuf-capi \
             header",
            path.display(),
            line + 1,
            committed.lines().nth(line).unwrap_or("<end of file>"),
            generated.lines().nth(line).unwrap_or("<end of file>"),
        );
    }
}
