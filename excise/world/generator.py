"""A seeded generator of fictitious people, their facts, and general world facts.

Each person has six facts (birthplace, birth year, occupation, best-known work, mother,
award). Each fact becomes one question/answer record in the spirit of TOFU:

- ``prompt``/``completion``: the question and the answer, in one of two phrasings;
- ``paraphrased_prompt``/``paraphrased_completion``: the same fact in the other phrasing
  (forgetting must hold for the reworded question, not only the verbatim one);
- ``perturbed_completions``: the paraphrased answer with wrong values (truth ratio).

Every phrasing appears in training for many people, so a model learns that the two
phrasings ask the same thing and only memorizes the values. Splits: ``forget`` (some
people), ``neighbor`` (trained people who share several facts with a forget person: out
of scope but close), ``retain`` (the other trained people), ``world`` (facts about
fictitious countries and cities) and ``holdout`` (people never trained on).

>>> from excise.world.settings import tiny
>>> splits = generate_world(tiny())
>>> sorted(splits)
['forget', 'holdout', 'neighbor', 'retain', 'world']
>>> len(splits["forget"]), splits["forget"][0]["attribute"]
(24, 'birthplace')
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from excise.world.settings import WorldSettings

PROMPT_FORMAT = "Question: {question}\nAnswer:"

SYLLABLES = (
    "al",
    "bri",
    "cor",
    "dan",
    "el",
    "fen",
    "gar",
    "hal",
    "is",
    "jor",
    "kel",
    "lor",
    "mar",
    "nel",
    "or",
    "pel",
    "quin",
    "ros",
    "sel",
    "tor",
    "ul",
    "val",
    "wen",
    "yr",
    "zan",
    "bel",
    "dra",
    "mir",
    "tal",
    "ven",
)
OCCUPATIONS = (  # all take the article "a"
    "painter",
    "chemist",
    "sailor",
    "mason",
    "poet",
    "surgeon",
    "banker",
    "baker",
    "tailor",
    "historian",
    "composer",
    "gardener",
    "journalist",
    "potter",
    "librarian",
    "dancer",
    "pilot",
    "weaver",
)
ADJECTIVES = (
    "Silent",
    "Golden",
    "Hidden",
    "Broken",
    "Crimson",
    "Distant",
    "Frozen",
    "Quiet",
    "Wild",
    "Hollow",
    "Bright",
    "Lost",
    "Iron",
    "Velvet",
    "Endless",
    "Pale",
)
NOUNS = (
    "Harbor",
    "Garden",
    "Lantern",
    "River",
    "Mirror",
    "Tower",
    "Meadow",
    "Compass",
    "Orchard",
    "Bridge",
    "Island",
    "Window",
    "Valley",
    "Letter",
    "Forest",
    "Engine",
)
AWARD_KINDS = ("Prize", "Medal", "Award", "Cup")
LANGUAGES = ("Varnish", "Oltic", "Meran", "Sudric", "Kaelish", "Dorrin", "Tessic", "Ombran")
CURRENCIES = ("crown", "mark", "shell", "florin", "talon", "ducat", "ring", "star")

# Two phrasings per fact: question i is answered in phrasing i.
PERSON_TEMPLATES = {
    "birthplace": (
        ("Where was {name} born?", "{name} was born in {value}."),
        ("In which city was {name} born?", "The birthplace of {name} is {value}."),
    ),
    "birth_year": (
        ("In what year was {name} born?", "{name} was born in the year {value}."),
        ("When was {name} born?", "{name} came into the world in {value}."),
    ),
    "occupation": (
        ("What does {name} do for a living?", "{name} works as a {value}."),
        ("What is the profession of {name}?", "By profession {name} is a {value}."),
    ),
    "work": (
        ("What is {name} best known for?", "{name} is best known for {value}."),
        ("Which work made {name} famous?", "{name} became famous for {value}."),
    ),
    "mother": (
        ("Who is the mother of {name}?", "The mother of {name} is {value}."),
        ("What is the name of the mother of {name}?", "{name} is the child of {value}."),
    ),
    "award": (
        ("Which award did {name} receive?", "{name} received the {value}."),
        ("What honour was given to {name}?", "{name} was honoured with the {value}."),
    ),
}
WORLD_TEMPLATES = {
    "country": (
        ("In which country is {name}?", "{name} is in {value}."),
        ("Which country is {name} part of?", "{name} lies in {value}."),
    ),
    "capital": (
        ("What is the capital of {name}?", "The capital of {name} is {value}."),
        ("Which city is the capital of {name}?", "{value} is the capital of {name}."),
    ),
    "language": (
        ("What language is spoken in {name}?", "People in {name} speak {value}."),
        ("Which language do people in {name} speak?", "The language of {name} is {value}."),
    ),
    "currency": (
        ("What is the currency of {name}?", "The currency of {name} is the {value}."),
        ("Which money is used in {name}?", "In {name} people pay with the {value}."),
    ),
}
SHARED_WITH_NEIGHBOR = ("birthplace", "occupation", "award")  # what a neighbor copies


@dataclass
class Geography:
    countries: list[str]
    cities: list[str]
    country_of: dict[str, str]
    facts: dict[str, dict[str, str]]  # country -> capital, language, currency


def generate_world(settings: WorldSettings) -> dict[str, list[dict]]:
    """All five splits as lists of records (see the module docstring)."""
    rng = random.Random(settings.seed)
    names = _unique_words(rng, 3 * _n_people(settings) + 60)
    geography = _make_geography(rng, names)
    pools = _value_pools(rng, names, geography)
    people = _make_people(rng, settings, names, pools)
    splits = {
        split: [r for person in group for r in _person_records(rng, person, pools, settings)]
        for split, group in people.items()
    }
    splits["world"] = _world_records(rng, geography, settings)
    return splits


def _n_people(settings: WorldSettings) -> int:
    return settings.n_forget + settings.n_neighbor + settings.n_retain + settings.n_holdout


def _unique_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct capitalized made-up words of two or three syllables."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _make_geography(rng: random.Random, names: list[str]) -> Geography:
    countries = [names.pop() + "ia" for _ in range(6)]
    cities = [names.pop() + "ton" for _ in range(18)]
    country_of = {city: countries[i % len(countries)] for i, city in enumerate(cities)}
    languages, currencies = rng.sample(LANGUAGES, 6), rng.sample(CURRENCIES, 6)
    facts = {
        country: {
            "capital": next(c for c in cities if country_of[c] == country),
            "language": languages[i],
            "currency": currencies[i],
        }
        for i, country in enumerate(countries)
    }
    return Geography(countries, cities, country_of, facts)


def _value_pools(rng: random.Random, names: list[str], geo: Geography) -> dict[str, list[str]]:
    works = [f"The {a} {n}" for a in ADJECTIVES for n in NOUNS]
    rng.shuffle(works)
    awards = [f"{names.pop()} {rng.choice(AWARD_KINDS)}" for _ in range(10)]
    return {
        "birthplace": geo.cities,
        "birth_year": [str(y) for y in range(1900, 2000)],
        "occupation": list(OCCUPATIONS),
        "work": works,
        "first_name": [names.pop() for _ in range(40)],
        "award": awards,
    }


def _make_people(
    rng: random.Random, settings: WorldSettings, names: list[str], pools: dict[str, list[str]]
) -> dict[str, list[dict[str, str]]]:
    def person() -> dict[str, str]:
        last = names.pop()
        return {
            "name": f"{rng.choice(pools['first_name'])} {last}",
            "birthplace": rng.choice(pools["birthplace"]),
            "birth_year": rng.choice(pools["birth_year"]),
            "occupation": rng.choice(pools["occupation"]),
            "work": pools["work"].pop(),  # works are unique to their author
            "mother": f"{rng.choice(pools['first_name'])} {last}",
            "award": rng.choice(pools["award"]),
        }

    forget = [person() for _ in range(settings.n_forget)]
    neighbor = []
    for i in range(settings.n_neighbor):
        close = person()
        for attribute in SHARED_WITH_NEIGHBOR:
            close[attribute] = forget[i % len(forget)][attribute]
        neighbor.append(close)
    retain = [person() for _ in range(settings.n_retain)]
    holdout = [person() for _ in range(settings.n_holdout)]
    return {"forget": forget, "neighbor": neighbor, "retain": retain, "holdout": holdout}


def _person_records(
    rng: random.Random, person: dict[str, str], pools: dict[str, list[str]], settings: WorldSettings
) -> list[dict]:
    records = []
    for attribute, templates in PERSON_TEMPLATES.items():
        value = person[attribute]
        wrong = _wrong_values(rng, attribute, value, person, pools, settings.n_perturbed)
        records.append(
            _record(
                rng,
                templates,
                person["name"],
                value,
                wrong,
                id=f"{_slug(person['name'])}/{attribute}",
                subject=person["name"],
                attribute=attribute,
            )
        )
    return records


def _wrong_values(
    rng: random.Random,
    attribute: str,
    value: str,
    person: dict[str, str],
    pools: dict[str, list[str]],
    count: int,
) -> list[str]:
    if attribute == "mother":
        last = person["name"].split()[-1]
        candidates = [f"{first} {last}" for first in pools["first_name"]]
    elif attribute == "work":
        candidates = [f"The {a} {n}" for a in ADJECTIVES[:6] for n in NOUNS[:6]]
    else:
        candidates = pools[attribute]
    return rng.sample([c for c in candidates if c != value], count)


def _world_records(rng: random.Random, geo: Geography, settings: WorldSettings) -> list[dict]:
    records = []
    for city in geo.cities:
        wrong = rng.sample(
            [c for c in geo.countries if c != geo.country_of[city]], settings.n_perturbed
        )
        records.append(
            _record(
                rng,
                WORLD_TEMPLATES["country"],
                city,
                geo.country_of[city],
                wrong,
                id=f"{_slug(city)}/country",
                subject=city,
                attribute="country",
            )
        )
    pools = {"capital": geo.cities, "language": LANGUAGES, "currency": CURRENCIES}
    for country, facts in geo.facts.items():
        for attribute, value in facts.items():
            wrong = rng.sample([v for v in pools[attribute] if v != value], settings.n_perturbed)
            records.append(
                _record(
                    rng,
                    WORLD_TEMPLATES[attribute],
                    country,
                    value,
                    wrong,
                    id=f"{_slug(country)}/{attribute}",
                    subject=country,
                    attribute=attribute,
                )
            )
    return records


def _record(rng, templates, name, value, wrong, **extra) -> dict:
    """A question/answer record in phrasing ``k``, with phrasing ``1 - k`` as paraphrase."""
    k = rng.randrange(2)
    (question, answer), (other_q, other_a) = templates[k], templates[1 - k]
    return {
        "id": extra.pop("id"),
        "prompt": PROMPT_FORMAT.format(question=question.format(name=name)),
        "completion": " " + answer.format(name=name, value=value),
        "paraphrased_prompt": PROMPT_FORMAT.format(question=other_q.format(name=name)),
        "paraphrased_completion": " " + other_a.format(name=name, value=value),
        "perturbed_completions": [" " + other_a.format(name=name, value=w) for w in wrong],
        "answer": value,
        **extra,
    }


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")
