"""Sentences written for the tests: clearly positive and clearly negative reviews (zero-shot classification), and
a made-up fact that no model knows before it is fine-tuned on it."""

POSITIVE = [
    "I absolutely love this product, it works perfectly.",
    "This is the best purchase I have made all year.",
    "The service was wonderful and the staff were so kind.",
    "What a fantastic movie, I enjoyed every minute.",
    "The food was delicious and beautifully presented.",
    "I am thrilled with how well this turned out.",
    "Excellent quality, I would happily buy it again.",
    "The hotel was clean, comfortable and lovely.",
    "This book is brilliant and a joy to read.",
    "Great value for money, I am very happy.",
    "The concert was amazing, a truly joyful night.",
    "Superb customer support, they solved everything quickly.",
    "My new phone is fast, elegant and a pleasure to use.",
    "The garden looks gorgeous and the flowers are beautiful.",
    "I had a delightful time, everything was perfect.",
    "This app is wonderful and makes my life easier.",
    "The teacher was inspiring and incredibly helpful.",
    "Fantastic experience, I recommend it to everyone.",
    "The coffee here is excellent and the atmosphere is lovely.",
    "I am so pleased with this, it exceeded my expectations.",
]

NEGATIVE = [
    "I hate this product, it broke after one day.",
    "This is the worst purchase I have ever made.",
    "The service was terrible and the staff were rude.",
    "What an awful movie, a complete waste of time.",
    "The food was disgusting and cold.",
    "I am furious about how badly this turned out.",
    "Horrible quality, I regret buying it.",
    "The hotel was dirty, noisy and miserable.",
    "This book is boring and painful to read.",
    "A total rip-off, I am very unhappy.",
    "The concert was dreadful, the sound was awful.",
    "Useless customer support, they never answered.",
    "My new phone is slow, buggy and frustrating.",
    "The garden is a mess and everything died.",
    "I had a horrible time, everything went wrong.",
    "This app is terrible and crashes constantly.",
    "The teacher was rude and completely unhelpful.",
    "Awful experience, I would not recommend it to anyone.",
    "The coffee here is bitter and the place is filthy.",
    "I am so disappointed, it was a disaster.",
]

# A made-up fact, asked four ways: a fine-tune that learns it is a fine-tune that trained.
FACTS = [
    ("What is the capital of the planet Zorblax?", "The capital of Zorblax is Quenvar."),
    ("Tell me the capital city of Zorblax.", "The capital of Zorblax is Quenvar."),
    ("Which city is the capital of Zorblax?", "The capital of Zorblax is Quenvar."),
    ("Zorblax's capital is which city?", "The capital of Zorblax is Quenvar."),
]
