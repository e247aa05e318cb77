"""Fine-tuning readers on small files in each benchmark's format."""
import pytest

from vqmoe_ds.data import DataError
from vqmoe_ds.data.classification import read_banking77, read_imdb, read_sst2, read_sst5, read_table


def test_sst2_glue_tsv(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text("sentence\tlabel\nhide new secretions \t0\nthe greatest musicians \t1\n")
    d = read_sst2(str(p))
    assert d.examples == [("hide new secretions ", 0), ("the greatest musicians ", 1)]
    assert d.label_names == ["negative", "positive"]


def test_sst2_unlabelled_test_split_is_refused(tmp_path):
    p = tmp_path / "test.tsv"
    p.write_text("index\tsentence\n0\tit 's a charming journey .\n")
    with pytest.raises(DataError, match="column 'label' is not in the header"):
        read_sst2(str(p))
    p.write_text("sentence\tlabel\nfine\t7\n")
    with pytest.raises(DataError, match=r"test.tsv:2: label '7'"):
        read_sst2(str(p))


def test_sst5_ptb_trees(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("(3 (2 It) (4 (4 (2 's) (4 good)) (2 .)))\n(0 (0 Awful) (1 (2 -LRB-) (1 film)))\n")
    d = read_sst5(str(p))
    assert d.examples == [("It 's good .", 3), ("Awful -LRB- film", 0)]
    assert d.num_labels == 5
    p.write_text("(3 (2 It) (4 good)\n")
    with pytest.raises(DataError, match="train.txt:1: not a labelled PTB tree"):
        read_sst5(str(p))


def test_sst5_tsv_with_and_without_header(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("4\ta triumph\n2\tit exists\n")
    assert read_sst5(str(p)).examples == [("a triumph", 4), ("it exists", 2)]
    p.write_text("sentence\tlabel\na mess\t1\n")
    assert read_sst5(str(p)).examples == [("a mess", 1)]


def test_imdb_folders(tmp_path):
    for label, texts in (("pos", ["great<br />film", "loved it"]), ("neg", ["dull"])):
        d = tmp_path / "aclImdb" / "train" / label
        d.mkdir(parents=True)
        for i, t in enumerate(texts):
            (d / f"{i}_9.txt").write_text(t)
    d = read_imdb(str(tmp_path / "aclImdb"), "train")
    assert d.examples == [("dull", 0), ("great<br />film", 1), ("loved it", 1)]
    assert d.label_names == ["neg", "pos"]
    with pytest.raises(DataError, match="test/neg does not exist"):
        read_imdb(str(tmp_path / "aclImdb"), "test")


def test_banking77_csv_and_shared_label_names(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('text,category\n"I lost my card, help",lost_or_stolen_card\nwhere is my money,pending_transfer\n'
                     'card stolen,lost_or_stolen_card\n')
    d = read_banking77(str(train))
    assert d.label_names == ["lost_or_stolen_card", "pending_transfer"]
    assert d.examples == [("I lost my card, help", 0), ("where is my money", 1), ("card stolen", 0)]
    test = tmp_path / "test.csv"
    test.write_text("text,category\nstill pending,pending_transfer\n")
    assert read_banking77(str(test), d.label_names).examples == [("still pending", 1)]
    test.write_text("text,category\nhi,unknown_intent\n")
    with pytest.raises(DataError, match="test.csv:2: label 'unknown_intent'"):
        read_banking77(str(test), d.label_names)


def test_generic_table(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("id\tlabel\tbody\n1\tspam\tbuy now\n2\tham\tsee you\n")
    d = read_table(str(p), "body", "label")
    assert d.label_names == ["ham", "spam"] and d.examples == [("buy now", 1), ("see you", 0)]
    p.write_text("id\tlabel\tbody\n1\tspam\n")
    with pytest.raises(DataError, match="x.tsv:2: 2 fields where the header has 3"):
        read_table(str(p), "body", "label")


@pytest.mark.parametrize("content,needle", [(None, "does not exist"), (b"", "is empty"), (b"\x00\x01\x02", "not text")])
def test_bad_files(tmp_path, content, needle):
    p = tmp_path / "train.tsv"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        read_sst2(str(p))
