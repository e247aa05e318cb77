"""Tools decode with the tokenizer the checkpoint recorded, even when the run's folder (config.json and its
--data-path) is not beside the checkpoint."""
import dataclasses

from vqmoe_ds.data.metadata import TokenizerMeta
from vqmoe_ds.data.tokenizers.byte import ByteTokenizer
from vqmoe_ds.checkpoint import PretrainedRun, tokenizer_for
from vqmoe_ds.models.configs import named_config


def test_recorded_char_tokenizer_is_used_without_the_run_folder():
    chars = "\n abcxyz"  # sorted alphabet: id = position
    meta = TokenizerMeta(kind="char", vocab_size=len(chars), dtype="uint8", chars=chars)
    run = PretrainedRun("/nowhere", "step1", named_config("tiny", vocab_size=len(chars)),
                        {"tokenizer": dataclasses.asdict(meta)}, {})
    tok = tokenizer_for(run)
    assert tok.kind == "char"
    ids = tok.encode("cab zy\n")
    assert list(ids) == [4, 2, 3, 1, 7, 6, 0]
    assert tok.decode(ids) == "cab zy\n"


def test_recorded_bytes_win_over_a_stale_run_config():
    run = PretrainedRun("/nowhere", "step1", named_config("tiny", vocab_size=256),
                        {"tokenizer": {"kind": "byte", "vocab_size": 256}},
                        {"args": {"data_path": "/gone/corpus"}})
    assert isinstance(tokenizer_for(run), ByteTokenizer)
