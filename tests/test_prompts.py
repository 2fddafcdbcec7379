from kscu.prompts import augmented_prompts


def test_variants_are_seeded_and_varied():
    a = augmented_prompts("Van Gogh", "style", 10, seed=0)
    assert a == augmented_prompts("Van Gogh", "style", 10, seed=0)
    assert a != augmented_prompts("Van Gogh", "style", 10, seed=1)
    assert len(a) == 10 and len(set(a)) == 10


def test_each_transform_keeps_the_concept_words():
    variants = augmented_prompts("church", "class", 8, seed=3)
    assert all("church" in v for v in variants)
    # (ii) deletion drops one non-concept word; (iii)/(iv) add one short token
    base_len = len("a photo of a church".split())
    assert len(variants[1].split()) == len("an image of the church".split()) - 1
    assert len(variants[2].split()) == len("a picture of a church".split()) + 1
    assert 1 <= len(variants[3].split()[-1]) <= 3
    assert sorted(variants[0].split()) == sorted("a photo of a church".split())
    assert base_len == 5
