"""The curated public API (httpx-style): a change to it is a decision, not an accident."""
import verify

EXPECTED = {
    "certify", "load_model", "Certificate", "CertificateTable", "Method", "BoundMethod", "register",
    "get_method", "list_methods", "Box", "LpBall", "Robust", "TopK", "Linear", "OutputBounds",
    "LinearSpec", "SpecError",
}


def test_public_names_are_pinned():
    assert set(verify.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(verify, name) is not None


def test_import_is_light():
    """Importing the front door must not pull in ONNX or solver stacks."""
    import subprocess
    import sys

    code = "import sys, verify; print(','.join(m for m in ('onnx','onnxruntime','cvxpy','highspy','matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import verify loaded {out}"
