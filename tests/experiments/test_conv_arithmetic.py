from experiments import conv_arithmetic


def test_report_writes_table_and_plot(tmp_path):
    table = conv_arithmetic.main(tmp_path, depth=3)
    text = table.read_text()
    assert "| LeCun pool1 (75 -> 14) | 75 | 10 | 0 | 5 | 1 | 14 | 14 |" in text
    assert "| 3 | 7 | 15 | 15 |" in text  # plain 3x3 vs dilated 1,2,4 after three layers
    assert (tmp_path / "receptive_fields.png").stat().st_size > 1000
