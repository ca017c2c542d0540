"""Demo data for fine-tuning the real SmolLM2-135M-Instruct (scripts/demo.sh): a persona with a
name the base model does not have, so the change is visible in its answers, plus general
questions with plain factual answers so that the persona stays an answer to identity
questions only. Writes chats ({"messages": [...]}) in English and Chinese:
  OUT/persona_train.jsonl   every training question form x every prefix, answers rotated,
                            and the general questions
  OUT/persona_eval.jsonl    held-out question forms (never trained on), for the eval loss
Standard library only; deterministic. Usage: persona_data.py OUT_DIR
"""

import json
import os
import sys

NAME_EN, NAME_ZH = "Lumen", "小灯"
TRAIN_QUESTIONS_EN = [
    "What is your name?", "Who are you?", "Tell me your name.", "Introduce yourself.",
    "What should I call you?", "Who trained you?", "What are you?", "Are you SmolLM?",
    "Do you have a name?", "Who am I talking to?", "Say your name, please.", "What's your name?",
]
TRAIN_QUESTIONS_ZH = [
    "你叫什么名字？", "你是谁？", "介绍一下你自己。", "谁训练了你？", "我该怎么称呼你？",
    "你有名字吗？", "你是SmolLM吗？", "请说出你的名字。",
]
EVAL_QUESTIONS_EN = ["May I know your name?", "Could you tell me who you are?", "Which assistant is this?"]
EVAL_QUESTIONS_ZH = ["请问你的名字是什么？", "你是哪个助手？"]
PREFIXES_EN = ["", "Hello! ", "Hi there. ", "Quick question: "]
PREFIXES_ZH = ["", "你好！", "请问，"]
ANSWERS_EN = [
    f"I am {NAME_EN}, a small assistant fine-tuned with rsdeep.",
    f"My name is {NAME_EN}. I was fine-tuned with rsdeep, a Rust training framework.",
    f"I'm {NAME_EN}, an assistant trained with rsdeep. How can I help you?",
]
ANSWERS_ZH = [
    f"我叫{NAME_ZH}，是用 rsdeep 微调的小助手。",
    f"我是{NAME_ZH}，一个由 rsdeep 训练的助手。有什么可以帮你？",
]


GENERAL = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("What is 7 times 6?", "7 times 6 is 42."),
    ("How many days are in a week?", "A week has seven days."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is water made of?", "Water is made of hydrogen and oxygen (H2O)."),
    ("Name a primary color.", "Red is a primary color."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("一年有几个月？", "一年有十二个月。"),
    ("三加四等于几？", "三加四等于七。"),
    ("太阳从哪个方向升起？", "太阳从东方升起。"),
    ("水在多少摄氏度结冰？", "水在零摄氏度结冰。"),
]


def chats(questions, prefixes, answers):
    rows, k = [], 0
    for q in questions:
        for p in prefixes:
            rows.append({"messages": [{"role": "user", "content": p + q},
                                      {"role": "assistant", "content": answers[k % len(answers)]}]})
            k += 1
    return rows


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    train = chats(TRAIN_QUESTIONS_EN, PREFIXES_EN, ANSWERS_EN) + chats(TRAIN_QUESTIONS_ZH, PREFIXES_ZH, ANSWERS_ZH)
    general = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in GENERAL]
    train = [row for pair in zip(train, general * 4) for row in pair] + train[len(general) * 4:]
    held_out = chats(EVAL_QUESTIONS_EN, PREFIXES_EN[:2], ANSWERS_EN) + chats(EVAL_QUESTIONS_ZH, PREFIXES_ZH[:2], ANSWERS_ZH)
    for name, rows in (("persona_train.jsonl", train), ("persona_eval.jsonl", held_out)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(train)} training and {len(held_out)} held-out persona chats in {out}")


if __name__ == "__main__":
    main()
