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


#: the Certificate's fields are the columns of every results CSV / JSON: a change is a format change
CERTIFICATE_FIELDS = [
    "method", "guarantee", "status", "certifies", "confidence", "index", "label", "prediction", "norm", "eps", "radius",
    "lower", "upper", "counterexample", "time_s", "details",
    "output_lower", "output_upper", "estimate", "estimate_lower", "estimate_upper",  # issue 20: regression, inverse task
]


def test_certificate_fields_are_pinned():
    from dataclasses import fields

    from verify.certificate import CERTIFIES, CSV_COLUMNS

    assert [f.name for f in fields(verify.Certificate)] == CERTIFICATE_FIELDS == CSV_COLUMNS
    assert CERTIFIES == ("base", "smoothed", "fraction")
    old = verify.Certificate(method="m", guarantee="deterministic", status="unknown")  # the new fields are optional
    assert old.output_lower is None and old.estimate is None


def test_import_is_light():
    """Importing the front door must not pull in ONNX or solver stacks."""
    import subprocess
    import sys

    code = "import sys, verify; print(','.join(m for m in ('onnx','onnxruntime','cvxpy','highspy','matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import verify loaded {out}"


def test_the_public_relax_and_smoothing_surfaces_are_pinned():
    import relax.bounds
    import relax.ir.graph
    import smoothing

    assert relax.bounds.__all__ == ["bounds", "lower_bounds", "intermediate_bounds", "METHODS", "prepare"]
    assert "build_graph" in relax.ir.graph.__all__
    assert sorted(smoothing.__all__) == sorted([
        "CertifyResult", "PredictResult", "certify", "predict", "Noise", "GaussianNoise", "LaplaceNoise",
        "UniformNoise", "ZhangNoise", "get_noise", "FLOAT_NOTE", "SmoothingConfigError", "check_n_alpha", "cp_lower",
        "cp_upper", "cp_interval", "min_samples"])
