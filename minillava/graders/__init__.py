"""The checks behind `minillava grade`: one file per chapter, `chNN.py`.

Each file sets TITLE (the chapter's name) and MODULE (the exercise file's name, without .py)
and registers its checks with the `@grader` decorator of `minillava.grading`. `grading`
finds the files by their names, so adding `ch05.py` here is all it takes to grade chapter 5.
See docs/grading.md.
"""
