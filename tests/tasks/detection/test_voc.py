"""Both PASCAL annotation parsers on files written here, including malformed ones."""

import numpy as np
import pytest

from cnn.tasks.detection import voc

LECTURE_V1 = '''# PASCAL Annotation Version 1.00

Image filename : "INRIA/Train/pos/crop_000010.png"
Image size (X x Y x C) : 594 x 720 x 3
Database : "The INRIA Rennes Database"
Objects with ground truth : 1 { "PASperson" }

# Note that there might be other objects in the image
# for which ground truth data has not been provided.

# Top left pixel co-ordinates : (0, 0)

# Details for object 1 ("PASperson")
# Center point -- not available in other PASCAL databases -- refers
# to person head center
Original label for object 1 "PASperson" : "UprightPerson"
Center point on object 1 "PASperson" (X, Y) : (341, 217)
Bounding box for object 1 "PASperson" (Xmin, Ymin) - (Xmax, Ymax) : (261, 109) - (511, 705)
'''

TWO_OBJECTS_V1 = '''# PASCAL Annotation Version 1.00
Image filename : "TUDarmstadt/PNGImages/motorbike-testset/motorbikes001.png"
Image size (X x Y x C) : 400 x 275 x 3
Database : "The TU Darmstadt Database"
Objects with ground truth : 2 { "PASmotorbikeSide" "PASperson" }
# Top left pixel co-ordinates : (1, 1)
Original label for object 1 "PASmotorbikeSide" : "motorbikeSide"
Bounding box for object 1 "PASmotorbikeSide" (Xmin, Ymin) - (Xmax, Ymax) : (14, 37) - (386, 272)
Pixel mask for object 1 "PASmotorbikeSide" : "TUDarmstadt/PNGMasks/motorbike-testset/motorbikes001-mask-01.png"
Bounding box for object 2 "PASperson" (Xmin, Ymin) - (Xmax, Ymax) : (100, 5) - (180, 150)
'''

VOC_XML = '''<annotation>
	<folder>VOC2007</folder>
	<filename>000001.jpg</filename>
	<source>
		<database>The VOC2007 Database</database>
		<annotation>PASCAL VOC2007</annotation>
	</source>
	<size>
		<width>353</width>
		<height>500</height>
		<depth>3</depth>
	</size>
	<segmented>0</segmented>
	<object>
		<name>dog</name>
		<pose>Left</pose>
		<truncated>1</truncated>
		<difficult>0</difficult>
		<bndbox>
			<xmin>48</xmin>
			<ymin>240</ymin>
			<xmax>195</xmax>
			<ymax>371</ymax>
		</bndbox>
	</object>
	<object>
		<name>person</name>
		<pose>Left</pose>
		<truncated>1</truncated>
		<difficult>1</difficult>
		<bndbox>
			<xmin>8</xmin>
			<ymin>12.5</ymin>
			<xmax>352</xmax>
			<ymax>498</ymax>
		</bndbox>
	</object>
</annotation>
'''


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_lecture_v1_sample(tmp_path):
    path = write(tmp_path, "crop_000010.txt", LECTURE_V1)
    record = voc.parse_pascal_v1(path)
    assert record.source_format == "pascal_v1"
    assert record.filename == "INRIA/Train/pos/crop_000010.png"
    assert (record.width, record.height, record.depth) == (594, 720, 3)
    assert record.database == "The INRIA Rennes Database"
    assert record.origin == (0, 0)
    assert record.path == str(path)
    assert len(record.objects) == 1
    person = record.objects[0]
    assert person.name == "PASperson"
    assert person.original_label == "UprightPerson"
    assert person.center == (341.0, 217.0)
    assert person.box == (261.0, 109.0, 511.0, 705.0)
    assert not person.difficult
    assert voc.parse_annotation(path) == record  # sniffed as version 1.00


def test_v1_two_objects_and_arrays(tmp_path):
    record = voc.parse_annotation(write(tmp_path, "motorbikes001.txt", TWO_OBJECTS_V1))
    assert [o.name for o in record.objects] == ["PASmotorbikeSide", "PASperson"]
    assert record.origin == (1, 1)
    assert record.objects[0].mask.endswith("motorbikes001-mask-01.png")
    assert record.objects[1].original_label is None
    boxes, classes, difficult = record.arrays(["PASperson", "PASmotorbikeSide"])
    np.testing.assert_array_equal(boxes, [[14, 37, 386, 272], [100, 5, 180, 150]])
    np.testing.assert_array_equal(classes, [1, 0])
    assert boxes.dtype == np.float32 and classes.dtype == np.int32 and not difficult.any()
    with pytest.raises(ValueError, match="'PASperson' is not in class_names"):
        record.arrays(["PASmotorbikeSide"])


def test_voc_xml(tmp_path):
    path = write(tmp_path, "000001.xml", VOC_XML)
    record = voc.parse_voc_xml(path)
    assert record.source_format == "voc_xml"
    assert (record.filename, record.folder, record.database) == ("000001.jpg", "VOC2007", "The VOC2007 Database")
    assert (record.width, record.height, record.depth) == (353, 500, 3)
    assert [o.name for o in record.objects] == ["dog", "person"]
    assert record.objects[0].box == (48.0, 240.0, 195.0, 371.0)
    assert record.objects[1].box == (8.0, 12.5, 352.0, 498.0)
    assert [o.difficult for o in record.objects] == [False, True]
    assert [o.truncated for o in record.objects] == [True, True]
    assert record.objects[0].pose == "Left"
    boxes, classes, difficult = record.arrays(voc.VOC_CLASSES)
    np.testing.assert_array_equal(classes, [voc.VOC_CLASSES.index("dog"), voc.VOC_CLASSES.index("person")])
    np.testing.assert_array_equal(difficult, [False, True])
    assert voc.parse_annotation(path) == record


def test_both_formats_give_the_same_record_type(tmp_path):
    v1 = voc.parse_annotation(write(tmp_path, "a.txt", LECTURE_V1))
    xml_text = voc.to_voc_xml(v1)
    back = voc.parse_annotation(write(tmp_path, "a.xml", xml_text))
    assert type(back) is type(v1)
    assert (back.filename, back.width, back.height, back.depth, back.database) == (
        v1.filename, v1.width, v1.height, v1.depth, v1.database)
    assert [(o.name, o.box) for o in back.objects] == [(o.name, o.box) for o in v1.objects]


# (file name, text, expected line, words the message must contain)
MALFORMED_V1 = [
    ("no_header.txt", LECTURE_V1.replace("# PASCAL Annotation Version 1.00", "PASCAL Annotation"), 1, "header"),
    ("bad_box.txt", LECTURE_V1.replace("(261, 109) - (511, 705)", "(261, 109) - (511)"), 18, "bounding box"),
    ("inverted_box.txt", LECTURE_V1.replace("(261, 109) - (511, 705)", "(511, 109) - (261, 705)"), 18, "Xmax < Xmin"),
    ("bad_size.txt", LECTURE_V1.replace("594 x 720 x 3", "594 x 720"), 4, "image size"),
    ("no_colon.txt", LECTURE_V1.replace('Database : "The', 'Database "The'), 5, "<field> : <value>"),
    ("wrong_label.txt", LECTURE_V1.replace('object 1 "PASperson" (Xmin', 'object 1 "PAScar" (Xmin'), 18, "'PAScar'"),
    ("bad_count.txt", LECTURE_V1.replace(': 1 { "PASperson" }', ': 2 { "PASperson" }'), 6, "count 2"),
    ("out_of_range.txt", LECTURE_V1.replace('for object 1 "PASperson" (Xmin', 'for object 3 "PASperson" (Xmin'), 18, "out of range"),
    ("no_box.txt", "\n".join(LECTURE_V1.splitlines()[:-1]) + "\n", 6, "no bounding box"),
    ("unquoted.txt", LECTURE_V1.replace('"INRIA/Train/pos/crop_000010.png"', "INRIA/x.png"), 3, "quoted"),
]


@pytest.mark.parametrize("name,text,line,words", MALFORMED_V1, ids=[m[0] for m in MALFORMED_V1])
def test_malformed_v1_names_file_and_line(tmp_path, name, text, line, words):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as info:
        voc.parse_pascal_v1(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message


MALFORMED_XML = [
    ("mismatched.xml", VOC_XML.replace("<xmax>195</xmax>", "<xmax>195</xmin>"), 22, "malformed XML: mismatched tag"),
    ("unclosed.xml", VOC_XML.replace("\t</object>\n\t<object>", "\t<object>"), 37, "malformed XML"),  # found at the end
    ("no_bndbox.xml", VOC_XML.replace("<bndbox>\n\t\t\t<xmin>48", "<box>\n\t\t\t<xmin>48").replace("<ymax>371</ymax>\n\t\t</bndbox>", "<ymax>371</ymax>\n\t\t</box>"), 14, "no <bndbox>"),
    ("bad_number.xml", VOC_XML.replace("<xmax>195</xmax>", "<xmax>19five</xmax>"), 22, "<xmax> must be a number"),
    ("bad_flag.xml", VOC_XML.replace("<difficult>0</difficult>", "<difficult>maybe</difficult>"), 18, "<difficult> must be 0 or 1"),
    ("no_size.xml", VOC_XML.replace("<size>", "<sighs>").replace("</size>", "</sighs>"), 1, "no <size>"),
    ("wrong_root.xml", "<notes>\n</notes>\n", 1, "expected <annotation>"),
]


@pytest.mark.parametrize("name,text,line,words", MALFORMED_XML, ids=[m[0] for m in MALFORMED_XML])
def test_malformed_xml_names_file_and_line(tmp_path, name, text, line, words):
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError) as info:
        voc.parse_annotation(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.xml"):
        voc.parse_annotation(tmp_path / "nowhere.xml")
    path = write(tmp_path, "notes.txt", "\n\nhello\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: neither VOC XML"):
        voc.parse_annotation(path)
