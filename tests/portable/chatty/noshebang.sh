echo "a script without its #! line"
