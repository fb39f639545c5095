"""Flags shared by the end-to-end tests: a small NRMS-sized model and a tiny generated demo corpus (608 training
samples, 80 dev impressions), so a full `main()` run takes about a second."""
SMALL_MODEL = ["--word_embedding_dim=50", "--head_num=4", "--head_dim=8", "--attention_dim=16", "--no-progress"]
TINY_DEMO = ["--demo_news=300", "--demo_users=120", "--demo_train_impressions=300",
             "--demo_dev_impressions=80", "--demo_test_impressions=80"]
