"""The patch series applies to the pinned source, skips applied patches, names broken ones."""

import importlib.util
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_source", ROOT / "native" / "prepare_source.py")
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)

SERIES = prep.patch_series(ROOT / "patches")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> pathlib.Path:
    # Only the files the series touches, from the pinned sdist (cached by the build).
    tree = tmp_path_factory.mktemp("pristine")
    wanted = {f for p in SERIES for f in prep.patch_files(p)}
    import tarfile

    with tarfile.open(prep.fetch_sdist(prep.cache_dir())) as tar:
        for m in tar.getmembers():
            rel = m.name[len(prep.VENDOR_PREFIX):]
            if m.name.startswith(prep.VENDOR_PREFIX) and rel in wanted:
                m.name = rel
                tar.extract(m, tree, filter="data")
    return tree


def test_series_is_numbered_and_indexed():
    assert SERIES and SERIES[0].name.startswith("0001-")
    index = (ROOT / "patches" / "README.md").read_text()
    for p in SERIES:
        assert p.name in index, f"{p.name} has no line in patches/README.md"


def test_series_applies_then_skips_when_applied(pristine, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    prep.apply_series(tree, SERIES)
    applied = {f: (tree / f).read_bytes() for p in SERIES for f in prep.patch_files(p)}
    prep.apply_series(tree, SERIES)  # second run: every patch already applied, nothing changes
    assert {f: (tree / f).read_bytes() for f in applied} == applied
    assert b"set_sinks_and_reserved" in (tree / "src" / "llama-kv-cache.h").read_bytes()
    assert b"llama_razor_build_attn(" in (tree / "src" / "llama-graph.cpp").read_bytes()


def test_series_only_hooks_upstream_files(pristine):
    """The razor sources live in native/; the patches only edit files that exist upstream."""
    for p in SERIES:
        text = p.read_text()
        assert "new file mode" not in text and "deleted file mode" not in text, p.name
        for f in prep.patch_files(p):
            assert (pristine / f).is_file(), f"{p.name} edits {f}, which is not an upstream file"
    for f in ("include/llama-razor.h", "src/llama-razor.cpp", "src/llama-kv-cache-razor.h", "src/llama-kv-cache-razor.cpp"):
        assert (ROOT / "native" / f).is_file(), f


def test_patch_that_does_not_apply_is_named(pristine, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(pristine, tree)
    h = tree / "src" / "llama-kv-cache.h"
    h.write_text(h.read_text().replace("ggml_tensor * get_k_storage(int32_t il) const;", "ggml_tensor * get_k(int32_t il) const;"))
    with pytest.raises(prep.SourceError, match=r"regenerate patch 0001"):
        prep.apply_series(tree, SERIES)


def test_stock_tree_has_no_patch(pristine, tmp_path):
    """--stock (the parity tests' reference build) is the sdist's tree as shipped."""
    tree = prep.prepare_tree(prep.fetch_sdist(prep.cache_dir()), None, tmp_path / "stock")
    files = sorted({f for p in SERIES for f in prep.patch_files(p) if (pristine / f).is_file()})
    assert files
    for f in files:
        assert (tree / f).read_bytes() == (pristine / f).read_bytes(), f


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "patches"
    bad.mkdir()
    (bad / "0001-bogus.patch").write_text("--- a/nope.c\n+++ b/nope.c\n@@ -1 +1 @@\n-a\n+b\n")
    rc = prep.main(["--patches", str(bad), "--tree", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "0001-bogus.patch" in err
