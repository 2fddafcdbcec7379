"""Prompt CSVs: a value that would name, seed or guide an image wrongly is refused by row."""

import pytest

from kscu.errors import KscuError
from kscu.promptfile import PromptRow, load_prompts


def load(tmp_path, text):
    path = tmp_path / "p.csv"
    path.write_text(text)
    return load_prompts(path)


def test_whole_numbers_are_read_as_ints(tmp_path):
    rows = load(
        tmp_path,
        "case_number,prompt,evaluation_seed,evaluation_guidance\n"
        "3.0,a cat,42.0,7\n 4 ,a dog,,\n,a tree,1e3,2.5\n",
    )
    assert rows == [
        PromptRow(3, "a cat", seed=42, guidance=7.0),
        PromptRow(4, "a dog"),
        PromptRow(2, "a tree", seed=1000, guidance=2.5),  # no case_number: the row's index
    ]
    assert all(type(r.case_number) is int for r in rows) and type(rows[0].seed) is int


@pytest.mark.parametrize(
    "name, words", [("sub/missing.csv", "does not exist"), ("", "is a folder")]
)
def test_a_local_path_that_is_no_file_says_so(tmp_path, name, words):
    """Before: a missing sub/missing.csv was looked up as a Hub dataset and failed as one."""
    with pytest.raises(KscuError, match=f"prompt file .* {words}; give a CSV path"):
        load_prompts(tmp_path / name if name else tmp_path)


@pytest.mark.parametrize("name", ["csv/three.txt", "sub/prompts", "csv/p.tsv", "./x/p"])
def test_a_mistyped_relative_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, name):
    """Before: "cannot fetch Hub dataset csv/three.txt (OfflineModeIsEnabled)" for a file
    that is simply missing (its folder is here, or its name has a file suffix)."""
    (tmp_path / "csv").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)

    def no_hub(repo_id):
        raise AssertionError(f"looked up {repo_id} on the Hub")

    monkeypatch.setattr("kscu.promptfile._load_hub_dataset", no_hub)
    with pytest.raises(KscuError, match=f"prompt file {name} does not exist"):
        load_prompts(name)
    calls = []
    monkeypatch.setattr("kscu.promptfile._load_hub_dataset", lambda r: calls.append(r) or [])
    load_prompts("someone/their-prompts")  # an owner/name id: still the Hub's
    assert calls == ["someone/their-prompts"]


def test_a_device_file_is_not_a_prompt_file():
    with pytest.raises(KscuError, match="prompt file /dev/null is not a regular file"):
        load_prompts("/dev/null")


def test_a_csv_saved_by_excel_starts_with_a_bom_and_reads_the_same(tmp_path):
    """Before: "has no 'prompt' column (columns: \ufeffprompt, ...)"."""
    path = tmp_path / "p.csv"
    path.write_bytes("prompt,case_number\na cat,3\n".encode("utf-8-sig"))
    assert load_prompts(path) == [PromptRow(3, "a cat")]


def test_a_large_seed_keeps_every_digit(tmp_path):
    (row,) = load(tmp_path, "prompt,evaluation_seed\na cat,9007199254740993\n")
    assert row.seed == 9007199254740993  # a float would round it to ...992


@pytest.mark.parametrize(
    "column, value, words",
    [
        ("case_number", "1.5", "case_number='1.5', which is not a whole number"),
        ("case_number", "inf", "case_number='inf', which is not a whole number"),
        ("case_number", "one", "case_number='one', which is not a whole number"),
        ("evaluation_seed", "2.5", "evaluation_seed='2.5', which is not a whole number"),
        ("evaluation_seed", "nan", "evaluation_seed='nan', which is not a whole number"),
        ("evaluation_guidance", "nan", "evaluation_guidance='nan', which is not a finite number"),
        ("evaluation_guidance", "inf", "evaluation_guidance='inf', which is not a finite number"),
        ("evaluation_guidance", "-inf", "evaluation_guidance='-inf', which is not a finite"),
        ("evaluation_guidance", "x", "evaluation_guidance='x', which is not a finite number"),
    ],
)
def test_a_bad_value_names_its_row(tmp_path, column, value, words):
    text = f"prompt,{column}\na church,1\na cat,{value}\n"
    with pytest.raises(KscuError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'p.csv'}: row 3 has ") and words in message
    assert "fix or drop it" in message and "\n" not in message


@pytest.mark.parametrize("cell", ["", "   ", '""'])
def test_an_empty_prompt_is_refused_by_row(tmp_path, cell):
    """Before: the row generated an unconditional image, while --prompt "" was refused."""
    with pytest.raises(KscuError, match=r"p.csv: row 3 has an empty prompt; write the prompt"):
        load(tmp_path, f"prompt,evaluation_seed\na cat,1\n{cell},2\n")


@pytest.mark.parametrize("text", ["prompt\na red circle, striped\n", "prompt,extra\na,b,c,d\n"])
def test_a_row_longer_than_the_header_is_refused(tmp_path, text):
    """Before: csv kept the extra cells under a hidden key, so a prompt with an unquoted comma
    was cut short and the manifest recorded the shortened prompt, without a word."""
    with pytest.raises(KscuError, match=r"p.csv: row 2 has more cells than the header"):
        load(tmp_path, text)
    assert load(tmp_path, 'prompt\n"a red circle, striped"\n')[0].prompt == "a red circle, striped"
    assert load(tmp_path, "case_number,prompt\n0,a church,\n1,a cat, ,\n")[1].prompt == "a cat"


@pytest.mark.parametrize(
    "text, number", [("12", 12), ("-3", -3), ("0", 0), ("²", None), ("--5", None), ("1.0", None)]
)
def test_case_numbers_are_ascii_whole_numbers(text, number):
    """``str.isdigit`` takes "²" and ``lstrip("-")`` takes "--5"; ``int`` takes neither."""
    from kscu.promptfile import whole_number

    assert whole_number(text) == number


def test_an_unclosed_quote_is_refused_not_read_to_the_end(tmp_path):
    """Before: the prompt quietly became the rest of the file."""
    with pytest.raises(
        KscuError,
        match=r"prompt file .*p.csv, the row from line 2: .*; close every quoted cell's quote",
    ):
        load(tmp_path, 'prompt\n"a red circle, striped\na blue square\n')


def test_a_semicolon_separated_file_is_named_as_such(tmp_path):
    """Before: "add one" (a 'prompt' column), while the header held it, split by semicolons."""
    with pytest.raises(KscuError, match=r"the header is split by semicolons; save the file with"):
        load(tmp_path, "prompt;case_number\na church;0\n")


@pytest.mark.parametrize(
    "text, column",
    [
        ("prompt,prompt\na red circle,a blue square\n", "prompt"),
        ("case_number,prompt,case_number\n0,a red circle,5\n", "case_number"),
    ],
)
def test_a_column_named_twice_is_refused(tmp_path, text, column):
    """Before: the last cell of the name won, silently (the image of "a blue square" was
    written for "a red circle"; case 0 was saved as 5.png)."""
    with pytest.raises(KscuError, match=rf"has the column '{column}' twice in its header"):
        load(tmp_path, text)
