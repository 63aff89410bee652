"""kmodguard.paths.Paths: whatever a caller hands (str from dnf, from options), the fields are Paths."""

from pathlib import Path

from kmodguard.paths import PATH_FIELDS, Paths


def test_str_paths_become_paths(tmp_path):
    given = {field: str(tmp_path / field) for field in PATH_FIELDS}
    for paths in (Paths(kver="6.1.0", **given), Paths.from_environment({}, kver="6.1.0", **given),
                  Paths(kver="6.1.0")._replace(**given)):
        for field in PATH_FIELDS:
            assert getattr(paths, field) == tmp_path / field and isinstance(getattr(paths, field), Path), field
        assert paths.installed_modules == tmp_path / "modules_dir"
        assert paths.index_root == tmp_path / "index_dir" and paths.snapshot == tmp_path / "runtime_dir/state.json"
    # ROOT as dnf gives it to its plugins, with the rest from the defaults
    paths = Paths.from_environment({}, kver="6.1.0", root=str(tmp_path))
    assert paths.installed_modules == tmp_path / "lib/modules/6.1.0"
    assert paths.with_kver("6.2.0").installed_modules == tmp_path / "lib/modules/6.2.0"
    assert Paths(firmware_dirs=["/a", "/b/{kver}"], kver="1").kernel_firmware_dirs == (Path("/a"), Path("/b/1"))


def test_environment_paths_are_paths(tmp_path):
    paths = Paths.from_environment({"KMODGUARD_ROOT": str(tmp_path), "KMODGUARD_FIRMWARE_DIRS": "/x:/y",
                                    "KMODGUARD_MODPROBE_DIRS": "/etc/modprobe.d"}, kver="1")
    assert paths.root == tmp_path and paths.firmware_dirs == (Path("/x"), Path("/y"))
    assert paths.modprobe_dirs == ("/etc/modprobe.d",)  # libkmod's strings
    assert Paths.from_environment(paths.as_environment(), kver="1") == paths
