"""Credentials never reach what we print or write: the one redaction helper (tasks/secrets.py), the error
type and the stage log that use it, and the tracking-URI refusal in the config. Fast: no pipeline runs."""

import logging
import re

import pytest

from tasks.config import load_config
from tasks.errors import PipelineError
from tasks.runner import stage_logging
from tasks.secrets import redact, uri_credentials

from conftest import REPO

FAKE = "FAKEsecret0123456789abcdef"


@pytest.mark.parametrize("text", [
    f"http://mlflow.internal:5000/?access_token={FAKE}",
    f"https://mlflow.internal/api?experiment=3&token={FAKE}",
    f"https://acct.blob.core.windows.net/models/x.onnx?sv=2022-11-02&se=2030-01-01&sr=b&sp=r&sig={FAKE}",
    f"https://api.example.org/v1?api_key={FAKE}",
    f"https://bucket.s3.amazonaws.com/x?X-Amz-Credential=AKIA/2024&X-Amz-Signature={FAKE}",
    f"https://func.azurewebsites.net/api/f?code={FAKE}",
    f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={FAKE};EndpointSuffix=core.windows.net",
    f"https://mlflow.internal/#token={FAKE}",
])
def test_a_credential_in_a_uri_or_connection_string_is_masked(text):
    masked = redact(text)
    assert FAKE not in masked and "***" in masked
    assert re.split(r"[?#;]", masked)[0] == re.split(r"[?#;]", text)[0]  # where it points stays readable


def test_the_user_info_of_a_uri_is_masked():
    assert redact(f"MLflow at https://me:{FAKE}@mlflow.internal/x failed") == "MLflow at https://***@mlflow.internal/x failed"
    assert redact(f"git clone https://{FAKE}@github.com/o/r") == "git clone https://***@github.com/o/r"


def test_credential_environment_values_are_masked_wherever_they_appear(monkeypatch):
    tokens = {"HF_TOKEN": "hf_FAKE0123456789abcdef", "MLFLOW_TRACKING_TOKEN": "mlflow-FAKE-0123456789",
              "AZURE_CLIENT_SECRET": "azure~FAKE.0123456789", "DATABRICKS_TOKEN": "dapiFAKE0123456789"}
    for name, value in tokens.items():
        monkeypatch.setenv(name, value)
    text = " | ".join(f"sent {value} as a header" for value in tokens.values())
    masked = redact(text)
    assert not [value for value in tokens.values() if value in masked], masked
    assert masked.count("***") == len(tokens)


def test_authorization_values_and_known_token_shapes_are_masked(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert redact("Authorization: Bearer abcdef0123456789") == "Authorization: Bearer ***"
    assert redact("headers={'authorization': 'Basic dXNlcjpwYXNz'}") == "headers={'authorization': 'Basic ***'}"
    assert redact("token hf_abcdefghijklmnopqrstuvwxyz0123 rejected") == "token *** rejected"
    assert redact('{"password": "hunter22", "user": "me"}') == '{"password": "***", "user": "me"}'


@pytest.mark.parametrize("text", [
    "finetune.rank=16 model.tiny.tokenizer_corpus=data/tokenizer_corpus.txt evaluate.max_new_tokens=40",
    "HTTP status_code=500 from http://127.0.0.1:5000/api/2.0/mlflow/runs/create at 15:01:05",
    "uploaded 3/12 cpu/model.onnx.data (1.2 of 3.4 MB) to mlflow-artifacts:/1/abc/artifacts/package",
    "publish.name 'ft-for-travel' is refused by MLflow; trust_remote_code=false",
    "override 'finetune.rank' is not KEY=VALUE; write e.g. finetune.rank=16",
])
def test_ordinary_settings_and_messages_are_left_alone(text):
    assert redact(text) == text


def test_uri_credentials_names_what_it_found_never_the_value():
    found = uri_credentials(f"https://me:{FAKE}@h/?experiment=2&access_token={FAKE}&sig={FAKE}")
    assert found == ["user-info (user:password@)", "parameter 'access_token'", "parameter 'sig'"]
    assert uri_credentials("http://127.0.0.1:5000/?experiment=2") == []


def test_an_error_line_never_shows_a_credential(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE)
    exc = PipelineError(f"MLflow at http://h/?sig={FAKE}: downloading failed: 401 for token {FAKE}")
    assert FAKE not in str(exc) and FAKE not in f"error: {exc}"
    assert str(exc).startswith("MLflow at http://h/?sig=***: downloading failed")


def test_a_stage_log_masks_credentials_in_its_file_and_on_the_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKE0123456789abcdef")
    path = tmp_path / "logs" / "base.log"
    with stage_logging(path):
        logging.getLogger("tasks.base_model").info("fetching from %s with %s", f"https://hub.internal/?token={FAKE}",
                                                   "hf_FAKE0123456789abcdef")
        try:
            raise RuntimeError(f"GET https://me:{FAKE}@hub.internal failed")
        except RuntimeError:
            logging.getLogger("huggingface_hub").exception("download failed")
    for text in (path.read_text(), capsys.readouterr().err):
        assert "fetching from https://hub.internal/?token=***" in text
        assert FAKE not in text and "hf_FAKE0123456789abcdef" not in text
    assert "https://***@hub.internal failed" in path.read_text()  # the traceback, too


@pytest.mark.parametrize("uri, found", [
    (f"http://127.0.0.1:5000/?access_token={FAKE}", "parameter 'access_token'"),
    (f"https://mlflow.internal/?token={FAKE}", "parameter 'token'"),
    (f"https://acct.blob.core.windows.net/x?sv=2022-11-02&sig={FAKE}", "parameter 'sig'"),
    (f"https://mlflow.internal/?api_key={FAKE}", "parameter 'api_key'"),
    (f"https://me:{FAKE}@mlflow.internal", "user-info"),
])
def test_a_credential_in_the_tracking_uri_is_refused_by_the_config_without_echoing_it(uri, found):
    with pytest.raises(PipelineError) as refused:
        load_config(REPO / "pipeline.toml", [f"publish.mlflow.tracking_uri={uri}"])
    line = str(refused.value)
    assert found in line and "MLFLOW_TRACKING_TOKEN" in line
    assert FAKE not in line and FAKE not in refused.value.args[0]
