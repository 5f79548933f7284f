"""A folder of .txt/.pdf documents as training data (continued pre-training), PDFs made here with pypdf."""

from __future__ import annotations

from pathlib import Path

import pytest

from trial_worker.config import DataConfig
from trial_worker.data import chunk_text, document_text, load_splits

CLIMATE = ("Glaciers retreat as the climate warms. Sea level rises when ice sheets melt. "
           "Carbon dioxide traps heat in the atmosphere. ")


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A real PDF with one line of Helvetica text per page."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    w = PdfWriter()
    for text in pages:
        page = w.add_blank_page(width=612, height=792)
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
            {NameObject("/F1"): w._add_object(font)})})
        stream = DecodedStreamObject()
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream.set_data(f"BT /F1 10 Tf 20 700 Td ({escaped}) Tj ET".encode("latin-1"))
        page[NameObject("/Contents")] = w._add_object(stream)
    with open(path, "wb") as f:
        w.write(f)
    return path


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "climate"
    (folder / "sub").mkdir(parents=True)
    write_pdf(folder / "report.pdf", [CLIMATE * 3, "Page two: " + CLIMATE * 2])
    (folder / "sub" / "notes.txt").write_text(CLIMATE * 6)
    (folder / "ignored.png").write_bytes(b"\x89PNG")
    return folder


def test_pdf_text_is_extracted(docs):
    text = document_text(docs / "report.pdf")
    assert "Glaciers retreat" in text and "Page two" in text


def test_documents_become_text_rows_of_at_most_max_seq_length_tokens(docs, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = DataConfig(path=str(docs), max_seq_length=64)
    train, val = load_splits(cfg, tokenizer=tok)
    rows = list(train) + list(val)
    assert len(rows) > 4 and len(val) >= 1
    assert all(r["prompt"] == "" and r["completion"] for r in rows)  # loss on the whole text
    assert all(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) <= 64 for r in rows)
    joined = " ".join(r["completion"] for r in rows)
    assert "Glaciers" in joined and "Page two" in joined


def test_chunking_without_a_tokenizer_counts_words():
    assert chunk_text("a b c d e f g", 5) == ["a b c", "d e f", "g"]


def test_a_production_run_trains_on_documents(docs, make_job, tmp_path):
    from trial_worker import production

    job = make_job(data={"path": str(docs), "validation_split": None, "validation_fraction": 0.2},
                   budget={"min": 4, "max": 4})
    metrics = production.train(job, tmp_path / "run")
    assert metrics["steps"] == 4 and metrics["val_loss"] > 0
