//! Resolving a source path (file, directory, glob; local or object store) to files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::ObjectStore;
use weir_common::Error;

/// One input file.
#[derive(Clone)]
pub struct FileEntry {
    /// Stable identity used in the loaded-file set and in messages: the path relative to
    /// the project for local files, the URL for object-store files.
    pub key: String,
    pub size: u64,
    pub location: Location,
}

#[derive(Clone)]
pub enum Location {
    Local(PathBuf),
    Remote {
        store: Arc<dyn ObjectStore>,
        path: ObjPath,
    },
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

fn hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

fn glob_matcher(pattern: &str) -> Result<globset::GlobMatcher, Error> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| Error::user(format!("invalid glob `{pattern}`: {e}")))
}

/// Lists the files `path` names, sorted by key.
pub async fn list_files(path: &str, root: &Path) -> Result<Vec<FileEntry>, Error> {
    let mut out = if path.contains("://") && !path.starts_with("file://") {
        list_remote(path).await?
    } else {
        let p = path.strip_prefix("file://").unwrap_or(path);
        list_local(p, root)?
    };
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn list_local(path: &str, root: &Path) -> Result<Vec<FileEntry>, Error> {
    let abs = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        root.join(path)
    };
    let key_of = |p: &Path| -> String {
        p.strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let entry = |p: PathBuf| -> Result<FileEntry, Error> {
        let meta =
            std::fs::metadata(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
        Ok(FileEntry {
            key: key_of(&p),
            size: meta.len(),
            location: Location::Local(p),
        })
    };
    let abs_str = abs.to_string_lossy().into_owned();
    if has_glob(&abs_str) {
        // Walk from the deepest directory without glob characters.
        let mut base = PathBuf::new();
        for comp in abs.components() {
            if has_glob(&comp.as_os_str().to_string_lossy()) {
                break;
            }
            base.push(comp);
        }
        if !base.is_dir() {
            return Err(Error::user(format!(
                "source directory `{}` does not exist",
                key_of(&base)
            ))
            .with_hint(
                "check `path:` in the pipeline; relative paths start at the project directory",
            ));
        }
        let matcher = glob_matcher(&abs_str)?;
        let mut files = Vec::new();
        walk(&base, &mut |p| {
            if matcher.is_match(p) {
                files.push(p.to_path_buf());
            }
        })?;
        files.into_iter().map(entry).collect()
    } else if abs.is_dir() {
        let mut files = Vec::new();
        walk(&abs, &mut |p| files.push(p.to_path_buf()))?;
        files.into_iter().map(entry).collect()
    } else if abs.is_file() {
        Ok(vec![entry(abs)?])
    } else {
        Err(
            Error::user(format!("source file `{path}` not found")).with_hint(
                "check `path:` in the pipeline; relative paths start at the project directory",
            ),
        )
    }
}

/// Visits regular files under `dir`, skipping hidden and `_`-prefixed entries.
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> Result<(), Error> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if hidden(&name) {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            walk(&p, f)?;
        } else {
            f(&p);
        }
    }
    Ok(())
}

async fn list_remote(path: &str) -> Result<Vec<FileEntry>, Error> {
    let glob_at = path.find(['*', '?', '[', '{']);
    let base = match glob_at {
        Some(i) => &path[..path[..i].rfind('/').map(|j| j + 1).unwrap_or(i)],
        None => path,
    };
    let url =
        url::Url::parse(base).map_err(|e| Error::user(format!("invalid URL `{path}`: {e}")))?;
    let (store, prefix) = object_store::parse_url_opts(&url, std::env::vars()).map_err(|e| {
        Error::user(format!("cannot open `{path}`: {e}")).with_hint(
            "object-store credentials come from the environment (AWS_*, GOOGLE_*, AZURE_*)",
        )
    })?;
    let store: Arc<dyn ObjectStore> = Arc::from(store);
    let scheme_host = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    let matcher = match glob_at {
        Some(_) => Some(glob_matcher(path)?),
        None => None,
    };
    let listed: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::external(format!("listing `{path}`: {e}")))?;
    let mut out = Vec::new();
    for meta in listed {
        let key = format!("{scheme_host}/{}", meta.location);
        let name = meta.location.filename().unwrap_or("");
        if hidden(name) || matcher.as_ref().is_some_and(|m| !m.is_match(&key)) {
            continue;
        }
        out.push(FileEntry {
            key,
            size: meta.size,
            location: Location::Remote {
                store: store.clone(),
                path: meta.location,
            },
        });
    }
    if out.is_empty() && matcher.is_none() {
        return Err(Error::user(format!("no files at `{path}`")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_globs_dirs_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("data/sub")).unwrap();
        for f in [
            "data/a.csv",
            "data/b.csv.gz",
            "data/sub/c.csv",
            "data/_skip.csv",
            "data/x.json",
        ] {
            std::fs::write(d.join(f), "h\n1\n").unwrap();
        }
        let keys = |v: Vec<FileEntry>| v.into_iter().map(|f| f.key).collect::<Vec<_>>();
        assert_eq!(
            keys(list_files("data/*.csv", d).await.unwrap()),
            vec!["data/a.csv"]
        );
        assert_eq!(
            keys(list_files("data/**/*.csv*", d).await.unwrap()),
            vec!["data/a.csv", "data/b.csv.gz", "data/sub/c.csv"]
        );
        assert_eq!(keys(list_files("data", d).await.unwrap()).len(), 4);
        assert_eq!(
            keys(list_files("data/x.json", d).await.unwrap()),
            vec!["data/x.json"]
        );
        let err = list_files("data/nope.csv", d).await.err().unwrap();
        assert_eq!(err.message, "source file `data/nope.csv` not found");
    }
}
