//! The folder layer on real files: kinds told apart, versions refused with their remedy, file
//! tables that catch a changed byte, staged folders that never leave a mix.

use retro_format::{
    remove_stale_staged, write_json_atomic, FileTable, FolderKind, FormatError, StagedDir,
};
use std::path::Path;

fn folder_of(kind: FolderKind, root: &Path, name: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = serde_json::json!({ "format_version": kind.version() });
    write_json_atomic(&dir.join(kind.marker()), &manifest).unwrap();
    dir
}

#[test]
fn each_kind_is_told_by_its_marker_and_a_wrong_kind_names_what_it_is() {
    let root = tempfile::tempdir().unwrap();
    for kind in FolderKind::ALL {
        let dir = folder_of(kind, root.path(), kind.short_name());
        assert_eq!(FolderKind::of(&dir), Some(kind));
        assert!(kind.open(&dir).is_ok());
        for other in FolderKind::ALL.into_iter().filter(|&o| o != kind) {
            let e = other.open(&dir).unwrap_err();
            assert!(
                matches!(e, FormatError::WrongKind { found, expected, .. } if found == kind && expected == other),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&format!(
                    "is a {}, not a {}",
                    kind.long_name(),
                    other.short_name()
                )),
                "{msg}"
            );
        }
    }
    let e = FolderKind::Dataset
        .open(&folder_of(FolderKind::Database, root.path(), "db2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("retro dataset build"), "the remedy: {e}");
}

#[test]
fn nothing_there_and_a_folder_of_other_files_are_missing_not_wrong_kind() {
    let root = tempfile::tempdir().unwrap();
    let e = FolderKind::Database
        .open(&root.path().join("nowhere"))
        .unwrap_err();
    assert!(matches!(e, FormatError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("no database here"), "{e}");
    let e = FolderKind::Run
        .open(&root.path().join("nowhere"))
        .unwrap_err();
    assert!(e.to_string().contains("no such run"), "{e}");
    std::fs::write(root.path().join("notes.txt"), "mine").unwrap();
    let e = FolderKind::Dataset.open(root.path()).unwrap_err();
    assert!(matches!(e, FormatError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("not a retro dataset"), "{e}");
}

#[test]
fn another_format_version_is_refused_with_the_remedy_and_a_damaged_manifest_is_corrupt() {
    let root = tempfile::tempdir().unwrap();
    let dir = folder_of(FolderKind::Dataset, root.path(), "ds");
    let marker = dir.join("dataset.json");
    std::fs::write(&marker, r#"{"format_version": 1}"#).unwrap();
    let e = FolderKind::Dataset
        .read_manifest::<serde_json::Value>(&dir)
        .unwrap_err();
    assert!(
        matches!(
            e,
            FormatError::Version {
                found: 1,
                expected: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("rebuild the dataset"), "{e}");
    for (bytes, says) in [
        (r#"{"files": {}}"#, "no format_version"),
        (r#"{"format_version": "2"}"#, "is not a number"),
        ("{ not json", "corrupt"),
    ] {
        std::fs::write(&marker, bytes).unwrap();
        let e = FolderKind::Dataset
            .read_manifest::<serde_json::Value>(&dir)
            .unwrap_err();
        assert!(matches!(e, FormatError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(says), "{bytes}: {e}");
    }
}

#[test]
fn a_file_table_catches_a_missing_a_shorter_and_a_changed_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    std::fs::write(dir.join("a.bin"), b"0123456789").unwrap();
    std::fs::write(dir.join("b.bin"), b"abc").unwrap();
    let t = FileTable::record(dir, ["a.bin", "b.bin"]).unwrap();
    assert_eq!(t.total_bytes(), 13);
    t.check(dir, "m.json", "redo", |_, _| true).unwrap();
    assert!(t.require(&dir.join("m.json"), ["a.bin", "c.bin"]).is_err());
    // Same JSON as a plain map: manifests written before the type existed still read.
    let json = serde_json::to_value(&t).unwrap();
    assert_eq!(json["a.bin"]["bytes"], 10);
    assert_eq!(serde_json::from_value::<FileTable>(json).unwrap(), t);

    std::fs::write(dir.join("a.bin"), b"0123456780").unwrap();
    // Sizes only: the changed byte passes; with checksums it does not.
    t.check(dir, "m.json", "redo", |_, _| false).unwrap();
    let e = t.check(dir, "m.json", "redo", |_, _| true).unwrap_err();
    assert!(e.to_string().contains("differs from m.json's"), "{e}");
    std::fs::write(dir.join("a.bin"), b"012").unwrap();
    let e = t.check(dir, "m.json", "redo", |_, _| false).unwrap_err();
    assert!(e.to_string().contains("3 bytes, m.json says 10"), "{e}");
    std::fs::remove_file(dir.join("b.bin")).unwrap();
    std::fs::write(dir.join("a.bin"), b"0123456789").unwrap();
    let e = t.check(dir, "m.json", "redo", |_, _| false).unwrap_err();
    assert!(matches!(e, FormatError::Missing { .. }), "{e}");
    // The id follows the checksums and the parameters.
    let again = FileTable::record(dir, ["a.bin"]).unwrap();
    assert_eq!(
        again.content_id("p"),
        FileTable::record(dir, ["a.bin"]).unwrap().content_id("p")
    );
    assert_ne!(again.content_id("p"), again.content_id("q"));
}

#[test]
fn a_staged_folder_replaces_only_its_own_kind_and_leftovers_of_dead_writers_go() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("base");
    let staged = FolderKind::Base.stage(&out, false).unwrap();
    std::fs::write(staged.path().join("x"), "new").unwrap();
    write_json_atomic(&staged.path().join("base.json"), &1).unwrap();
    staged.commit().unwrap();
    assert_eq!(std::fs::read_to_string(out.join("x")).unwrap(), "new");
    // Replacing needs overwrite; a folder of other files is never replaced.
    assert!(FolderKind::Base.stage(&out, false).is_err());
    let mine = root.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep").unwrap();
    let e = FolderKind::Base
        .stage(&mine, true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is not a base"), "{e}");
    // Dropped uncommitted: nothing stays.
    drop(StagedDir::new(&root.path().join("other"), "m.json", "thing", false).unwrap());
    let names = || -> Vec<String> {
        std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(!names().iter().any(|n| n.starts_with('.')), "{:?}", names());
    // Leftovers of a writer that died (pid 0 is never a user process): a staged build is removed;
    // a moved-aside old version whose folder is gone is put back.
    std::fs::create_dir(root.path().join(".ckpt-1.building-0-5")).unwrap();
    std::fs::create_dir(root.path().join(".ckpt-2.old-0-5")).unwrap();
    std::fs::write(root.path().join(".ckpt-2.old-0-5/w"), "old").unwrap();
    remove_stale_staged(root.path());
    let mut n = names();
    n.sort();
    assert_eq!(n, ["base", "ckpt-2", "mine"]);
    assert_eq!(
        std::fs::read_to_string(root.path().join("ckpt-2/w")).unwrap(),
        "old"
    );
}
