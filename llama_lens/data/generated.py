"""Generated English texts to train and evaluate lenses on, without a download.

`generated_texts` writes short English paragraphs from templates and word lists in this file (geography,
animals, everyday stories, counting, recipes, weather), deterministic by seed. They belong to this project
and carry its licence, so notebooks and tests can train a tuned lens without a download. They are simple
text, not a web corpus: a lens trained on them transfers to everyday prose, less so to code or dialogue.
"""

from __future__ import annotations

import random

from ..errors import ArgumentError

COUNTRIES = [
    # (country, capital, language, another city, continent)
    ("France", "Paris", "French", "Lyon", "Europe"),
    ("Germany", "Berlin", "German", "Munich", "Europe"),
    ("Italy", "Rome", "Italian", "Milan", "Europe"),
    ("Spain", "Madrid", "Spanish", "Barcelona", "Europe"),
    ("Portugal", "Lisbon", "Portuguese", "Porto", "Europe"),
    ("Japan", "Tokyo", "Japanese", "Osaka", "Asia"),
    ("China", "Beijing", "Chinese", "Shanghai", "Asia"),
    ("India", "New Delhi", "Hindi", "Mumbai", "Asia"),
    ("Egypt", "Cairo", "Arabic", "Alexandria", "Africa"),
    ("Kenya", "Nairobi", "Swahili", "Mombasa", "Africa"),
    ("Brazil", "Brasilia", "Portuguese", "Rio de Janeiro", "South America"),
    ("Argentina", "Buenos Aires", "Spanish", "Cordoba", "South America"),
    ("Canada", "Ottawa", "English", "Toronto", "North America"),
    ("Mexico", "Mexico City", "Spanish", "Guadalajara", "North America"),
    ("Australia", "Canberra", "English", "Sydney", "Oceania"),
    ("Russia", "Moscow", "Russian", "Saint Petersburg", "Europe"),
    ("Greece", "Athens", "Greek", "Thessaloniki", "Europe"),
    ("Turkey", "Ankara", "Turkish", "Istanbul", "Asia"),
    ("Poland", "Warsaw", "Polish", "Krakow", "Europe"),
    ("Sweden", "Stockholm", "Swedish", "Gothenburg", "Europe"),
]
ANIMALS = [
    # (animal, where it lives, what it eats, a trait)
    ("cat", "houses", "fish and meat", "curious"),
    ("dog", "houses", "meat", "loyal"),
    ("horse", "farms", "grass and hay", "strong"),
    ("cow", "farms", "grass", "calm"),
    ("lion", "the savanna", "meat", "powerful"),
    ("elephant", "the savanna", "leaves and fruit", "clever"),
    ("penguin", "cold places", "fish", "playful"),
    ("owl", "the forest", "mice", "quiet"),
    ("rabbit", "the fields", "carrots and grass", "shy"),
    ("dolphin", "the sea", "fish", "friendly"),
    ("bee", "gardens", "nectar", "busy"),
    ("fox", "the forest", "small animals and berries", "clever"),
]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Lily", "Max", "Nora", "Oscar", "Sam"]
PLACES = ["park", "market", "library", "beach", "school", "museum", "garden", "station", "bakery", "river"]
THINGS = ["a red ball", "a small book", "an old map", "a blue kite", "a warm coat", "a box of apples", "a new bike"]
FEELINGS = ["happy", "tired", "surprised", "hungry", "excited", "calm", "proud"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
]  # fmt: skip
DISHES = [
    ("pancakes", ["flour", "milk", "eggs", "a pinch of salt"], "fry them in a hot pan"),
    ("tomato soup", ["tomatoes", "an onion", "water", "salt"], "let it boil for twenty minutes"),
    ("bread", ["flour", "water", "yeast", "salt"], "bake it in the oven for forty minutes"),
    ("a fruit salad", ["apples", "bananas", "oranges", "a little honey"], "serve it cold"),
    ("rice with vegetables", ["rice", "carrots", "peas", "oil"], "cook the rice in boiling water"),
]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "foggy"]
SEASONS = ["spring", "summer", "autumn", "winter"]


def _geography(rng: random.Random) -> str:
    country, capital, language, city, continent = rng.choice(COUNTRIES)
    sentences = [
        f"{country} is a country in {continent}.",
        f"The capital of {country} is {capital}.",
        f"Most people in {country} speak {language}.",
        f"{city} is another large city in {country}.",
        f"Many visitors travel to {capital} every year to see its museums and old streets.",
        f"If you fly from {capital} to {city}, the trip is short.",
    ]
    first, rest = sentences[:2], sentences[2:]
    rng.shuffle(rest)
    return " ".join(first + rest[: rng.randint(2, len(rest))])


def _animals(rng: random.Random) -> str:
    (animal, home, food, trait), (other, _, other_food, _) = rng.sample(ANIMALS, 2)
    article = "An" if animal[0] in "aeiou" else "A"
    return (
        f"{article} {animal} is a {trait} animal. It lives in {home} and eats {food}. "
        f"Unlike the {other}, which eats {other_food}, the {animal} "
        f"{rng.choice(['sleeps during the day', 'is active in the morning', 'likes to rest in the shade'])}. "
        f"Children often learn about the {animal} at school."
    )


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    place, other_place = rng.sample(PLACES, 2)
    thing = rng.choice(THINGS)
    feeling = rng.choice(FEELINGS)
    day = rng.choice(WEEKDAYS)
    return (
        f"On {day}, {name} went to the {place} with {friend}. They found {thing} near the entrance. "
        f'"Look at this," said {name}. {friend} smiled and said, "We should take it to the {other_place}." '
        f"So they walked to the {other_place} together. At the end of the day, {name} felt {feeling}, "
        f"and {friend} promised to come back next {rng.choice(WEEKDAYS)}."
    )


def _counting(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        start = rng.randrange(0, len(NUMBER_WORDS) - 6)
        words = NUMBER_WORDS[start : start + rng.randint(4, 6)]
        return f"Let us count: {', '.join(words)}. After {words[-1]} comes {NUMBER_WORDS[start + len(words)]}."
    if kind == 1:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return (
            f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}. "
            f"{a} + {b} = {a + b}, and {a + b} - {b} = {a}."
        )
    if kind == 2:
        start = rng.randrange(7)
        days = [WEEKDAYS[(start + i) % 7] for i in range(4)]
        return f"The days go {', '.join(days)}. The day after {days[-1]} is {WEEKDAYS[(start + 4) % 7]}."
    start = rng.randrange(12)
    months = [MONTHS[(start + i) % 12] for i in range(3)]
    return (
        f"{months[0]}, {months[1]} and {months[2]} are months of the year. "
        f"After {months[2]} comes {MONTHS[(start + 3) % 12]}. A year has twelve months."
    )


def _recipe(rng: random.Random) -> str:
    dish, ingredients, last = rng.choice(DISHES)
    listed = ", ".join(ingredients[:-1]) + f" and {ingredients[-1]}"
    return (
        f"To make {dish}, you need {listed}. First, wash your hands and put everything on the table. "
        f"Mix the {ingredients[0]} with the {ingredients[1]}. Then {last}. "
        f"{dish[0].upper() + dish[1:]} is a simple meal for {rng.choice(['breakfast', 'lunch', 'dinner'])}."
    )


def _weather(rng: random.Random) -> str:
    season = rng.choice(SEASONS)
    weather, later = rng.sample(WEATHER, 2)
    country, capital, *_ = rng.choice(COUNTRIES)
    degrees = rng.randint(-5, 35)
    return (
        f"In {season}, the weather in {capital} is often {weather}. Today it is {degrees} degrees. "
        f"Tomorrow will be {later}, so people in {country} should "
        f"{rng.choice(['take an umbrella', 'wear a hat', 'stay inside', 'go for a walk'])}."
    )


GENERATORS = (_geography, _animals, _story, _counting, _recipe, _weather)


def generated_texts(n: int, *, seed: int = 0, paragraphs: int = 3) -> list[str]:
    """`n` short English texts, each `paragraphs` generated paragraphs of mixed kinds; deterministic by seed.

    Use different seeds for training and held-out texts (the paragraphs are new sentences from the same
    templates, so held-out scores measure fit to this kind of text, not to English at large).

    Args:
        n: how many texts.
        seed: the random seed.
        paragraphs: paragraphs per text (each 30-70 tokens with a Llama tokenizer).

    Returns:
        [n] texts.
    """
    if n < 0 or paragraphs < 1:
        raise ArgumentError(f"need n >= 0 and paragraphs >= 1, got n={n}, paragraphs={paragraphs}")
    rng = random.Random(seed)
    return ["\n\n".join(rng.choice(GENERATORS)(rng) for _ in range(paragraphs)) for _ in range(n)]
