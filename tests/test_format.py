"""model.h and export.py describe the same file: every field at the same offset with the same size."""
import os
import struct
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, ROOT)
import export as ex  # noqa: E402


def test_struct_layouts_agree(tmp_path):
    exe = tmp_path / "format_offsets"
    subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                    os.path.join(ROOT, "tests", "format_offsets.c")], check=True)
    c_fields = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        name, off, size = line.split()
        c_fields[name] = (int(off), int(size))
    py_fields = {}
    for struct_name, fields in [("FileHeader", ex.HEADER_FIELDS), ("LayerConfig", ex.LAYER_FIELDS),
                                ("TensorEntry", ex.TENSOR_FIELDS)]:
        off = 0
        for name, code in fields:
            size = struct.calcsize("<" + code)
            py_fields[f"{struct_name}.{name}"] = (off, size)
            off += size
    assert py_fields == c_fields
    print(f"\n[format] {len(c_fields)} fields agree")
